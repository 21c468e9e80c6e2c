"""Summarise a particle file or a volume: count, box, pixel size and the metadata present.

For particles (.star, .mrcs, .hdf, .cs) it prints the number of images, the box
size, the pixel size, the number of stack files, and which metadata groups every
particle has: CTF, 3D orientations, 2D alignment, classes, ground truth (true_*
columns), plus the other columns kept as passthrough. For a volume (.mrc flagged
as a volume, or a 3D .hdf) it prints the shape, voxel size and value range.
No file is modified.

Examples
--------
  isavar info particles.star
  isavar info sphire_stack.hdf
  isavar info J42_particles.cs --json
  isavar info map.mrc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isavar.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``info`` options."""
    parser.add_argument("path", metavar="FILE", help="particle file or volume")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def _group_status(table, columns) -> str:
    present = [c for c in columns if c in table.columns]
    if not present:
        return "no"
    complete = all(not table[c].isna().any() for c in columns if c in table.columns) and len(present) == len(columns)
    return "yes" if complete else "partial"


def particle_summary(path) -> dict:
    """Summary dict of a particle file (used by ``isavar info``)."""
    from isavar.io import read_particles
    from isavar.io.particles import (
        ALIGN2D_COLUMNS,
        CANONICAL_COLUMNS,
        CTF_COLUMNS,
        ORIENTATION_COLUMNS,
        TRUTH_PREFIX,
    )

    stack = read_particles(path)
    try:
        table = stack.table
        truth = [c for c in table.columns if c.startswith(TRUTH_PREFIX)]
        summary = {
            "file": str(path),
            "kind": "particles",
            "count": len(table),
            "box": stack.images.box,
            "pixel_size_A": stack.pixel_size_A,
            "stacks": len(stack.images.sources),
            "ctf": _group_status(table, CTF_COLUMNS),
            "orientations_3d": _group_status(table, ORIENTATION_COLUMNS),
            "alignment_2d": _group_status(table, ALIGN2D_COLUMNS),
            "classes": int(table["class_number"].nunique()) if "class_number" in table else 0,
            "ground_truth": truth,
            "passthrough": [c for c in table.columns if c not in CANONICAL_COLUMNS and c not in truth],
        }
        if "optics_group" in table:
            summary["optics_groups"] = int(table["optics_group"].nunique())
        from isavar.io.particles import duplicated_rows

        summary["duplicated_rows"] = int(duplicated_rows(table).sum())
    finally:
        stack.close()
    return summary


def volume_summary(path) -> dict:
    """Summary dict of a volume (used by ``isavar info``)."""
    from isavar.io import read_volume

    volume, voxel = read_volume(path)
    return {"file": str(path), "kind": "volume", "shape": list(volume.shape), "voxel_size_A": voxel,
            "min": float(volume.min()), "max": float(volume.max()), "mean": float(volume.mean()),
            "std": float(volume.std())}


def _format(summary: dict) -> str:
    if summary["kind"] == "volume":
        return "\n".join([
            f"file          {summary['file']}",
            "kind          volume",
            f"shape         {' x '.join(map(str, summary['shape']))} (z, y, x)",
            f"voxel size    {summary['voxel_size_A']} Å",
            f"values        min {summary['min']:.4g}  max {summary['max']:.4g}  mean {summary['mean']:.4g}  "
            f"std {summary['std']:.4g}",
        ])
    pixel = "unknown" if summary["pixel_size_A"] is None else f"{summary['pixel_size_A']:g} Å"
    lines = [
        f"file          {summary['file']}",
        "kind          particles",
        f"count         {summary['count']}",
        f"box           {summary['box']} px",
        f"pixel size    {pixel}",
        f"stack files   {summary['stacks']}",
    ]
    if "optics_groups" in summary:
        lines.append(f"optics groups {summary['optics_groups']}")
    lines += [
        f"CTF           {summary['ctf']}",
        f"3D angles     {summary['orientations_3d']}",
        f"2D alignment  {summary['alignment_2d']}",
        f"classes       {summary['classes'] if summary['classes'] else 'no'}",
        f"ground truth  {', '.join(summary['ground_truth']) if summary['ground_truth'] else 'no'}",
        f"duplicates    {summary['duplicated_rows']} rows repeat an earlier row"
        if summary.get("duplicated_rows") else None,
        f"passthrough   {len(summary['passthrough'])} columns"
        + (f" ({', '.join(summary['passthrough'][:8])}{', ...' if len(summary['passthrough']) > 8 else ''})"
           if summary["passthrough"] else ""),
    ]
    return "\n".join(line for line in lines if line is not None)


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.path``; returns 0."""
    from isavar.cli.convert import _is_volume

    path = Path(args.path)
    if not str(path).startswith("bdb:") and not path.exists():
        raise InputError("file not found", path=path)
    summary = volume_summary(path) if _is_volume(path) else particle_summary(path)
    print(json.dumps(summary, indent=2) if args.json else _format(summary))
    return 0
