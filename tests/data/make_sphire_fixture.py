"""Write tests/data/sphire_relion2sphire.hdf with real EMAN2 2.91 + SPHIRE 1.4.2 (run with SPHIRE's Python).

Three 16x16 images whose headers are set the way SPHIRE's ``sp_relion2sphire.py`` sets them from a RELION
particle: ``sp_utilities.set_params_proj(img, [phi, theta, psi, s2x, s2y])`` with the Euler angles of
``Transform({"type": "mrc", "phi": rot, "theta": tilt, "omega": psi, "tx": originX, "ty": originY})
.get_params("spider")`` (so s2x is RELION's origin in pixels), and ``sp_utilities.generate_ctf([defocus,
cs, voltage, apix, bfactor, ampcont, dfdiff, dfang])`` with defocus = (U + V) / 20000, dfdiff = (V - U) / 10000,
dfang = 45 - rlnDefocusAngle (mod 180), ampcont = 100 x rlnAmplitudeContrast. The planted RELION values
are in PLANTED below (and in the test that reads the file). Usage:

    /path/to/sphire-venv/bin/python -W ignore tests/data/make_sphire_fixture.py tests/data/sphire_relion2sphire.hdf
"""

import sys

import numpy as np
from EMAN2 import EMData, EMNumPy, Transform
from sphire.libpy import sp_utilities

#: RELION particles: rot, tilt, psi (deg), originX, originY (px), defocusU, defocusV (Å), defocusAngle (deg)
PLANTED = [
    (10.0, 50.0, 120.0, 2.0, -1.0, 21000.0, 25000.0, 30.0),
    (200.0, 80.0, -30.0, -3.5, 0.5, 15000.0, 14000.0, 100.0),
    (-60.0, 140.0, 75.0, 0.25, 4.0, 30000.0, 30500.0, 170.0),
]
APIX, VOLTAGE, CS, AMP = 1.5, 300.0, 2.7, 0.1


def main(path):
    rng = np.random.default_rng(0)
    for i, (rot, tilt, psi, ox, oy, u, v, ang) in enumerate(PLANTED):
        img = EMData(16, 16)
        EMNumPy.em2numpy(img)[:] = rng.normal(size=(16, 16)).astype(np.float32)
        img.update()
        t = Transform({"type": "mrc", "phi": rot, "theta": tilt, "omega": psi, "tx": ox, "ty": oy, "tz": 0})
        p = t.get_params("spider")
        sp_utilities.set_params_proj(img, [p["phi"], p["theta"], p["psi"], p["tx"], p["ty"]])
        dfang = (45.0 - ang) % 180.0
        ctf = sp_utilities.generate_ctf([(u + v) / 20000.0, CS, VOLTAGE, APIX, 0.0, 100.0 * AMP,
                                         (v - u) / 10000.0, dfang])
        img.set_attr("ctf", ctf)
        img.set_attr("ctf_applied", 0)
        img.set_attr("apix_x", APIX)
        img.set_attr("apix_y", APIX)
        img.write_image(path, i)
    # what SPHIRE reads back: get_params_proj returns s2x = RELION's origin
    for i in range(len(PLANTED)):
        img = EMData(path, i)
        print(i, sp_utilities.get_params_proj(img), img.get_attr("ctf").to_dict())


if __name__ == "__main__":
    main(sys.argv[1])
