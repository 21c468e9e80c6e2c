"""Write the BDB test fixture with real EMAN2 2.91 + SPHIRE 1.4.2 (not run by the tests; see README.md).

Run from tests/data/bdb with EMAN2/SPHIRE's python (see README.md), e.g.
    rm -rf EMAN2DB sub stack.hdf truth.json && /path/to/sphire-venv/bin/python make_fixture.py
The planted values are written to truth.json from the inputs below (never read back from the files).
"""

import json
import subprocess
import sys

import numpy as np

import EMAN2
import EMAN2db
from EMAN2 import EMData, EMNumPy
from sphire.libpy import sp_utilities

N, BOX, APIX = 6, 32, 1.5
rng = np.random.RandomState(14)
pixels = rng.standard_normal((N, BOX, BOX)).astype(np.float32)    # tests recompute these from the seed
truth = {"n": N, "box": BOX, "apix": APIX, "seed": 14, "images": []}
for i in range(N):
    defocus_um, dfdiff_um, dfang_deg = 1.2 + 0.3 * i, 0.05 * i, 10.0 + 20 * i
    cs, voltage, bfactor, ampcont = 2.7, 300.0, 0.0, 10.0
    phi, theta, psi, s2x, s2y = 15.0 * i, 10.0 + 12 * i, 100.0 - 7 * i, 0.5 * i - 1.0, 1.25 - 0.25 * i
    alpha, sx, sy, mirror = 33.0 * i, -0.75 * i, 0.5 + 0.25 * i, i % 2
    img = EMData(BOX, BOX)              # (numpy2em images lack is_complex_x, so EMAN2 would not read them back)
    EMNumPy.em2numpy(img)[:] = pixels[i]
    img.update()
    img.set_attr("apix_x", APIX)
    img.set_attr("apix_y", APIX)
    img.set_attr("apix_z", APIX)
    img.set_attr("ctf", sp_utilities.generate_ctf([defocus_um, cs, voltage, APIX, bfactor, ampcont, dfdiff_um,
                                                   dfang_deg]))
    img.set_attr("ctf_applied", 0)
    sp_utilities.set_params_proj(img, [phi, theta, psi, s2x, s2y])
    sp_utilities.set_params2D(img, [alpha, sx, sy, mirror, 1.0])
    img.set_attr("ptcl_source_image", "Movies/mic_%03d.mrc" % (i // 2))
    img.set_attr("ptcl_source_coord", [100 + 10 * i, 200 - 5 * i])
    img.set_attr("ISAC_class_id", i // 3)
    img.set_attr("my_weight", 0.25 * i)
    img.write_image("bdb:stack", i)
    img.write_image("stack.hdf", i)
    truth["images"].append(dict(defocus_um=defocus_um, dfdiff_um=dfdiff_um, dfang_deg=dfang_deg, cs_mm=cs,
                                voltage_kV=voltage, bfactor=bfactor, ampcont_percent=ampcont, phi=phi,
                                theta=theta, psi=psi, s2x=s2x, s2y=s2y, alpha=alpha, sx=sx, sy=sy,
                                mirror=mirror, micrograph="Movies/mic_%03d.mrc" % (i // 2),
                                coord=[100 + 10 * i, 200 - 5 * i], isac_class=i // 3, my_weight=0.25 * i))

EMAN2db.db_close_dict("bdb:stack")          # flush it for the e2bdb.py processes below

# a virtual stack of images 4, 1, 5 (e2bdb.py --makevstack --list, as sp_pipe isac_substack makes them) with
# new 2D alignments imported by sp_header.py, and a virtual stack in another directory of every second image
with open("vlist.txt", "w") as fh:
    fh.write("4\n1\n5\n")
subprocess.check_call(["e2bdb.py", "bdb:stack", "--makevstack=bdb:vstack", "--list=vlist.txt"])
v_align = [[5.0, 1.0, -1.0, 0, 1.0], [-40.0, 0.0, 2.0, 1, 1.0], [170.0, -2.5, 0.5, 0, 1.0]]
with open("valign.txt", "w") as fh:
    fh.write("".join(" ".join(str(v) for v in row) + "\n" for row in v_align))
subprocess.check_call(["sp_header.py", "bdb:vstack", "--import=valign.txt", "--params=xform.align2d"])
subprocess.check_call(["e2bdb.py", "bdb:stack", "--makevstack=bdb:sub#vsub", "--step=0,2"])
truth["vstack"] = {"members": [4, 1, 5], "align2d": v_align}
truth["vsub"] = {"members": [0, 2, 4]}
truth["made_with"] = {"eman2": EMAN2.EMANVERSION if hasattr(EMAN2, "EMANVERSION") else "2.91",
                      "python": sys.version.split()[0]}
with open("truth.json", "w") as fh:
    json.dump(truth, fh, indent=1)
