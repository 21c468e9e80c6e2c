"""RELION STAR files: 3.0 and 3.1 reading, optics merge/split, image names, passthrough, round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from isavar.errors import InputError
from isavar.io import read_particles, write_image_stack, write_particles

from _io_helpers import assert_tables_match, full_table, random_images


def test_round_trip_keeps_every_column(tmp_path, rng):
    images = random_images(rng, 6, 16)
    table = full_table(rng, 6)
    write_particles(tmp_path / "p.star", images, table, pixel_size_A=1.5)
    assert (tmp_path / "p.mrcs").exists()
    stack = read_particles(tmp_path / "p.star")
    assert stack.pixel_size_A == 1.5
    np.testing.assert_array_equal(stack.images[:], images)
    assert_tables_match(stack.table, table)
    assert stack.table["image_index"].tolist() == list(range(6))
    assert set(stack.table["image_path"]) == {str((tmp_path / "p.mrcs").resolve())}
    stack.close()


def test_written_layout_is_relion_31(tmp_path, rng):
    table = full_table(rng, 4)
    write_particles(tmp_path / "p.star", random_images(rng, 4, 8), table, pixel_size_A=2.0)
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"].tolist() == [2.0]
    assert optics["rlnImageSize"].tolist() == [8]
    assert optics["rlnImageDimensionality"].tolist() == [2]
    assert optics["rlnVoltage"].tolist() == [300.0]
    assert particles["rlnImageName"].tolist()[:2] == ["000001@p.mrcs", "000002@p.mrcs"]
    for label in ("rlnOriginXAngst", "rlnAngleRot", "rlnDefocusU", "rlnClassNumber", "rlnOpticsGroup",
                  "rlnIsavar_true_angle_rot_deg", "rlnIsavar_align_mirror", "rlnRandomSubset"):
        assert label in particles.columns, label
    assert "rlnVoltage" not in particles.columns


def test_optics_groups_split_by_value(tmp_path, rng):
    table = full_table(rng, 6)
    table["voltage_kV"] = [300.0, 300.0, 200.0, 200.0, 300.0, 200.0]
    write_particles(tmp_path / "p.star", random_images(rng, 6, 8), table, pixel_size_A=1.0)
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    assert len(blocks["optics"]) == 2
    stack = read_particles(tmp_path / "p.star")
    assert stack.table["voltage_kV"].tolist() == table["voltage_kV"].tolist()
    assert stack.table["optics_group"].nunique() == 2


def _write_relion30(tmp_path, rng, *, subfolder="Extract"):
    """Two stacks in a subfolder, a RELION 3.0 STAR above them naming images out of order."""
    folder = tmp_path / subfolder
    folder.mkdir()
    a, b = random_images(rng, 3, 10), random_images(rng, 4, 10)
    write_image_stack(folder / "a.mrcs", a, 1.0)
    write_image_stack(folder / "b.mrcs", b, 1.0)
    text = """
data_images

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnDefocusAngle #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnOriginX #8
_rlnOriginY #9
_rlnAngleRot #10
_rlnAngleTilt #11
_rlnAnglePsi #12
_rlnMagnification #13
_rlnDetectorPixelSize #14
_rlnLogLikeliContribution #15
000002@{f}/b.mrcs 20000 19000 10 300 2.7 0.1 3.0 -2.0 10 20 30 10000 2.5 1.5
000001@{f}/a.mrcs 21000 20000 12 300 2.7 0.1 -1.5 0.5 11 21 31 10000 2.5 2.5
000004@{f}/b.mrcs 22000 21000 14 300 2.7 0.1 0.0 1.0 12 22 32 10000 2.5 3.5
""".replace("{f}", subfolder)
    (tmp_path / "old.star").write_text(text)
    return a, b


def test_relion30_pixels_origins_and_relative_stacks(tmp_path, rng):
    a, b = _write_relion30(tmp_path, rng)
    stack = read_particles(tmp_path / "old.star")
    t = stack.table
    assert stack.pixel_size_A == pytest.approx(2.5)
    np.testing.assert_allclose(t["origin_x_A"], [7.5, -3.75, 0.0])
    np.testing.assert_allclose(t["origin_y_A"], [-5.0, 1.25, 2.5])
    assert t["image_index"].tolist() == [1, 0, 3]
    np.testing.assert_array_equal(stack.images[:], np.stack([b[1], a[0], b[3]]))
    assert t["rlnLogLikeliContribution"].tolist() == [1.5, 2.5, 3.5]
    assert len(stack.images.sources) == 2
    assert "rlnOriginX" not in t.columns


def test_relion30_written_back_as_31_with_angstrom_origins(tmp_path, rng):
    _write_relion30(tmp_path, rng)
    stack = read_particles(tmp_path / "old.star")
    write_particles(tmp_path / "new.star", stack.images, stack.table)
    blocks = starfile.read(tmp_path / "new.star", always_dict=True)
    np.testing.assert_allclose(blocks["particles"]["rlnOriginXAngst"], [7.5, -3.75, 0.0])
    assert "rlnOriginX" not in blocks["particles"].columns
    again = read_particles(tmp_path / "new.star")
    assert_tables_match(again.table, stack.table, ["origin_x_A", "origin_y_A", "angle_rot_deg", "defocus_u_A",
                                                   "rlnLogLikeliContribution", "voltage_kV"])
    np.testing.assert_array_equal(again.images[:], stack.images[:])


def test_relion31_optics_merge_and_particle_values_win(tmp_path, rng):
    write_image_stack(tmp_path / "s.mrcs", random_images(rng, 2, 8), 0.0)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["g1", "g2"], "rlnVoltage": [300.0, 200.0],
                           "rlnSphericalAberration": [2.7, 2.0], "rlnAmplitudeContrast": [0.1, 0.07],
                           "rlnImagePixelSize": [1.1, 1.2], "rlnImageSize": [8, 8], "rlnImageDimensionality": [2, 2]})
    particles = pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"], "rlnOpticsGroup": [2, 1],
                              "rlnOriginXAngst": [1.0, 2.0], "rlnOriginYAngst": [0.0, 0.0],
                              "rlnAmplitudeContrast": [0.2, 0.3]})
    starfile.write({"particles": particles, "optics": optics}, tmp_path / "p.star")
    t = read_particles(tmp_path / "p.star").table
    assert t["voltage_kV"].tolist() == [200.0, 300.0]
    assert t["pixel_size_A"].tolist() == [1.2, 1.1]
    assert t["amplitude_contrast"].tolist() == [0.2, 0.3]
    assert t["optics_group"].tolist() == [2, 1]


def test_undefined_optics_group(tmp_path, rng):
    write_image_stack(tmp_path / "s.mrcs", random_images(rng, 1, 8), 1.0)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0]})
    particles = pd.DataFrame({"rlnImageName": ["1@s.mrcs"], "rlnOpticsGroup": [3]})
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "p.star")
    with pytest.raises(InputError, match="optics group 3"):
        read_particles(tmp_path / "p.star")


def test_missing_stack_and_index_past_end(tmp_path, rng):
    write_image_stack(tmp_path / "s.mrcs", random_images(rng, 2, 8), 1.0)
    pd_block = pd.DataFrame({"rlnImageName": ["1@s.mrcs", "3@s.mrcs"]})
    starfile.write(pd_block, tmp_path / "past.star")
    with pytest.raises(InputError, match=r"s.mrcs: image index 3 \(1-based\) is past the end"):
        read_particles(tmp_path / "past.star")
    starfile.write(pd.DataFrame({"rlnImageName": ["1@gone.mrcs"]}), tmp_path / "gone.star")
    with pytest.raises(InputError, match="gone.star: image stack gone.mrcs .* not found"):
        read_particles(tmp_path / "gone.star")


def test_mixed_box_sizes(tmp_path, rng):
    write_image_stack(tmp_path / "a.mrcs", random_images(rng, 1, 8), 1.0)
    write_image_stack(tmp_path / "b.mrcs", random_images(rng, 1, 10), 1.0)
    starfile.write(pd.DataFrame({"rlnImageName": ["1@a.mrcs", "1@b.mrcs"]}), tmp_path / "m.star")
    with pytest.raises(InputError, match="mixed box sizes"):
        read_particles(tmp_path / "m.star")


def test_not_a_particle_star(tmp_path):
    starfile.write(pd.DataFrame({"rlnMicrographName": ["a.mrc"]}), tmp_path / "mics.star")
    with pytest.raises(InputError, match="mics.star: no data block with an rlnImageName"):
        read_particles(tmp_path / "mics.star")


def test_pixel_size_required_to_write(tmp_path, rng):
    with pytest.raises(InputError, match="pixel size is unknown"):
        write_particles(tmp_path / "p.star", random_images(rng, 2, 8), pd.DataFrame(index=range(2)))


def test_existing_outputs_refused(tmp_path, rng):
    images, table = random_images(rng, 2, 8), full_table(rng, 2)
    write_image_stack(tmp_path / "p.mrcs", images, 1.0)
    with pytest.raises(InputError, match="p.mrcs: already exists"):
        write_particles(tmp_path / "p.star", images, table, pixel_size_A=1.0)
    assert not (tmp_path / "p.star").exists()
    write_particles(tmp_path / "p.star", images, table, pixel_size_A=1.0, overwrite=True)


def test_chunk_iterable_input(tmp_path, rng):
    images = random_images(rng, 5, 8)
    write_particles(tmp_path / "p.star", (images[i:i + 2] for i in range(0, 5, 2)), full_table(rng, 5),
                    pixel_size_A=1.0)
    np.testing.assert_array_equal(read_particles(tmp_path / "p.star").images[:], images)


def test_one_stack_named_two_ways_is_opened_once(tmp_path, rng):
    images = random_images(rng, 3, 8)
    write_image_stack(tmp_path / "s.mrcs", images, 1.0)
    starfile.write(pd.DataFrame({"rlnImageName": ["1@s.mrcs", "3@./s.mrcs", f"2@{tmp_path / 's.mrcs'}"]}),
                   tmp_path / "p.star")
    stack = read_particles(tmp_path / "p.star")
    assert len(stack.images.sources) == 1
    np.testing.assert_array_equal(stack.images[:], images[[0, 2, 1]])
