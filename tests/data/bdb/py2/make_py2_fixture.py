"""Write a BDB stack whose keys and headers are genuine Python 2 pickles (EMAN2 2.x, before Python 3).

EMAN2 2.x's EMAN2db.py stored ``cPickle.dumps(key, -1)`` -> ``cPickle.dumps(header, -1)`` (protocol 2) and
``"NXxNYxNZ" + dumps(key, -1)`` -> ``dumps(slot, -1)``; Boost.Python pickled Transform and EMAN2Ctf as
``(libpyTransform2.Transform, (matrix,))`` and ``(libpyAligner2.EMAN2Ctf, (vector,))``. No EMAN2 for Python 2
can be built here, so step 1 pickles the same shapes with stand-in classes registered under EMAN2's module
names, by Python 2.7.18's own cPickle; step 2 (Python 3 + berkeleydb, libdb 5.3) stores those bytes
unchanged in EMAN2's layout and writes the raw pixels.

    cd tests/data/bdb/py2
    PYENV_VERSION=2.7.18 python make_py2_fixture.py      # -> py2_records.json (hex pickles)
    python3 make_py2_fixture.py                          # -> EMAN2DB/old.bdb, EMAN2DB/old_32x32x1
"""
import json
import math
import sys
import types

N, BOX = 3, 32


def planted():
    """The planted header values (plain numbers: both Pythons compute them the same way)."""
    rows = []
    for i in range(N):
        a = math.radians(30.0 * i)
        c, s = math.cos(a), math.sin(a)
        sx, sy = 1.0 + i, -2.0 + 0.5 * i
        # xform.align2d of (alpha=30 i, sx, sy, mirror 0): [R(alpha) | (sx, sy)], R = [[c, s], [-s, c]]
        align = [c, s, 0.0, sx, -s, c, 0.0, sy, 0.0, 0.0, 1.0, 0.0]
        # xform.projection: Rz(90 + 10 i) (tilt 0) with origin (0.5 i, -1) pixels
        b = math.radians(90.0 + 10 * i)
        cb, sb = math.cos(b), math.sin(b)
        proj = [cb, sb, 0.0, 0.5 * i, -sb, cb, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0]
        ctf = [1.5 + 0.25 * i, 0.0, 0.0, 0.0, 10.0, 300.0, 2.7, 2.0, 0.0, 0.0, 0.0]
        rows.append(dict(align=align, proj=proj, ctf=ctf, alpha=30.0 * i, sx=sx, sy=sy, rot_plus_psi=90.0 + 10 * i,
                         ox=0.5 * i, oy=-1.0, defocus_um=1.5 + 0.25 * i))
    return rows


def python2_records():
    import cPickle

    def fake(module, name):
        mod = sys.modules.setdefault(module, types.ModuleType(module))

        class Stand(object):
            def __init__(self, values):
                self.values = values

            def __reduce__(self):
                return (Stand, (self.values,))
        Stand.__name__ = name
        Stand.__module__ = module
        setattr(mod, name, Stand)
        return Stand

    Transform = fake("libpyTransform2", "Transform")
    EMAN2Ctf = fake("libpyAligner2", "EMAN2Ctf")
    fkey = "%dx%dx%d" % (BOX, BOX, 1)
    records = []
    for i, p in enumerate(planted()):
        header = {"nx": BOX, "ny": BOX, "nz": 1, "is_complex": 0, "is_complex_x": 0, "is_complex_ri": 1,
                  "apix_x": 2.0, "apix_y": 2.0, "apix_z": 2.0, "ctf": EMAN2Ctf(p["ctf"]),
                  "xform.projection": Transform(p["proj"]), "xform.align2d": Transform(p["align"]),
                  "ptcl_source_image": "mic_\xe9t\xe9_%d.mrc" % i,      # a Python 2 str holding Latin-1 bytes
                  "note": u"caf\xe9",                                  # a Python 2 unicode
                  "members": [3 * i, 3 * i + 1, 3 * i + 2], "big": 2 ** 40 + i, "ok": True,
                  "timestamp": "2016/05/04 12:00:00"}
        records.append((cPickle.dumps(i, -1), cPickle.dumps(header, -1)))
        records.append((fkey + cPickle.dumps(i, -1), cPickle.dumps(N - 1 - i, -1)))   # slots in reverse order
    records.append((cPickle.dumps(fkey, -1), cPickle.dumps(N - 1, -1)))
    records.append((cPickle.dumps("maxrec", -1), cPickle.dumps(N - 1, -1)))
    with open("py2_records.json", "w") as fh:
        json.dump({"python": sys.version.split()[0], "records": [[k.encode("hex"), v.encode("hex")]
                                                                  for k, v in records]}, fh, indent=0)


def python3_database():
    import os

    import numpy as np
    from berkeleydb import db

    data = json.load(open("py2_records.json"))
    os.makedirs("EMAN2DB", exist_ok=True)
    handle = db.DB()
    handle.open("EMAN2DB/old.bdb", "old", db.DB_BTREE, db.DB_CREATE)
    for k, v in data["records"]:
        handle.put(bytes.fromhex(k), bytes.fromhex(v))
    handle.close()
    pixels = np.random.RandomState(27).standard_normal((N, BOX, BOX)).astype("<f4")
    with open("EMAN2DB/old_%dx%dx1" % (BOX, BOX), "wb") as fh:
        fh.write(pixels[::-1].tobytes())                 # image k sits in slot N - 1 - k
    json.dump({"python2": data["python"], "images": planted(), "seed": 27, "box": BOX, "n": N},
              open("truth.json", "w"), indent=1)


if __name__ == "__main__":
    python2_records() if sys.version_info[0] == 2 else python3_database()
