"""SPHIRE's own files: an HDF stack written by real EMAN2 2.91 + SPHIRE 1.4.2 (tests/data, see its README) is
read with the planted RELION origins, angles and astigmatic CTF; and, where SPHIRE is installed
(``ISAVAR_SPHIRE_PYTHON`` = its Python), SPHIRE reads what isavar writes with the same values."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isavar.conventions import euler_to_matrix
from isavar.io import read_particles, write_particles

DATA = Path(__file__).resolve().parents[1] / "data"
#: The RELION particles planted in sphire_relion2sphire.hdf (see make_sphire_fixture.py):
#: rot, tilt, psi (deg), originX, originY (px), defocusU, defocusV (Å), defocusAngle (deg).
PLANTED = np.array([
    (10.0, 50.0, 120.0, 2.0, -1.0, 21000.0, 25000.0, 30.0),
    (200.0, 80.0, -30.0, -3.5, 0.5, 15000.0, 14000.0, 100.0),
    (-60.0, 140.0, 75.0, 0.25, 4.0, 30000.0, 30500.0, 170.0),
])
APIX = 1.5


def _axis_diff(a, b):
    """Difference of two astigmatism angles (axes, period 180 degrees)."""
    return np.abs((np.asarray(a) - np.asarray(b) + 90.0) % 180.0 - 90.0)


def test_sphire_written_stack_reads_with_the_planted_relion_values():
    stack = read_particles(DATA / "sphire_relion2sphire.hdf")
    t = stack.table
    assert stack.pixel_size_A == pytest.approx(APIX)
    for i, (rot, tilt, psi, ox, oy, u, v, ang) in enumerate(PLANTED):
        a = euler_to_matrix(t["angle_rot_deg"][i], t["angle_tilt_deg"][i], t["angle_psi_deg"][i])
        np.testing.assert_allclose(a, euler_to_matrix(rot, tilt, psi), atol=1e-5)
        # the shift SPHIRE stored as -s2x comes back as RELION's origin (a sign error doubles every shift)
        assert t["origin_x_A"][i] == pytest.approx(ox * APIX, abs=1e-4)
        assert t["origin_y_A"][i] == pytest.approx(oy * APIX, abs=1e-4)
        assert t["defocus_u_A"][i] == pytest.approx(u, abs=0.5)
        assert t["defocus_v_A"][i] == pytest.approx(v, abs=0.5)
        assert _axis_diff(t["defocus_angle_deg"][i], ang) < 1e-3
    np.testing.assert_allclose(t["amplitude_contrast"], 0.1, atol=1e-6)
    np.testing.assert_allclose(t["voltage_kV"], 300.0)


_SPHIRE = os.environ.get("ISAVAR_SPHIRE_PYTHON")

_READ_WITH_SPHIRE = """
import json, sys
from EMAN2 import EMData, EMUtil
from sphire.libpy import sp_utilities
out = []
for i in range(EMUtil.get_image_count(sys.argv[1])):
    img = EMData(sys.argv[1], i)
    c = img.get_attr("ctf").to_dict()
    out.append([list(sp_utilities.get_params_proj(img)), c["defocus"], c["dfdiff"], c["dfang"], c["ampcont"]])
print(json.dumps(out))
"""


@pytest.mark.sphire
@pytest.mark.skipif(not _SPHIRE, reason="set ISAVAR_SPHIRE_PYTHON to the Python of an EMAN2/SPHIRE build")
def test_sphire_reads_what_isavar_writes(tmp_path):
    """isavar's HDF read by SPHIRE's get_params_proj: s2x is RELION's origin; the CTF is what
    sp_relion2sphire would have written for the same RELION particle."""
    rot, tilt, psi, ox, oy, u, v, ang = PLANTED.T
    table = pd.DataFrame({"angle_rot_deg": rot, "angle_tilt_deg": tilt, "angle_psi_deg": psi,
                          "origin_x_A": ox * APIX, "origin_y_A": oy * APIX, "defocus_u_A": u, "defocus_v_A": v,
                          "defocus_angle_deg": ang, "voltage_kV": 300.0, "cs_mm": 2.7,
                          "amplitude_contrast": 0.1})
    path = tmp_path / "isavar.hdf"
    write_particles(path, np.zeros((len(table), 16, 16), np.float32), table, pixel_size_A=APIX)
    result = subprocess.run([_SPHIRE, "-W", "ignore", "-c", _READ_WITH_SPHIRE, str(path)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for (params, defocus, dfdiff, dfang, ampcont), row in zip(got, PLANTED):
        phi, theta, psi_s, s2x, s2y = params
        np.testing.assert_allclose(euler_to_matrix(phi, theta, psi_s), euler_to_matrix(*row[:3]), atol=1e-5)
        assert (s2x, s2y) == pytest.approx((row[3], row[4]), abs=1e-4)
        assert defocus == pytest.approx((row[5] + row[6]) / 20000, abs=1e-6)
        assert dfdiff == pytest.approx((row[6] - row[5]) / 10000, abs=1e-6)
        assert _axis_diff(dfang, 45.0 - row[7]) < 1e-3
        assert ampcont == pytest.approx(10.0)
