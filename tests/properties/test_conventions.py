"""Round trips and known values for every conversion in isavar.conventions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar import conventions as cv

angle = st.floats(-180.0, 180.0, allow_nan=False)
tilt = st.floats(0.0, 180.0, allow_nan=False)
shift = st.floats(-50.0, 50.0, allow_nan=False)


@given(angle, tilt, angle)
def test_euler_matrix_round_trip(rot, t, psi):
    a = cv.euler_to_matrix(rot, t, psi)
    back = cv.euler_to_matrix(*cv.matrix_to_euler(a))
    np.testing.assert_allclose(back, a, atol=1e-9)


@given(angle, tilt, angle)
def test_euler_matrix_is_rotation(rot, t, psi):
    a = cv.euler_to_matrix(rot, t, psi)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(a) == pytest.approx(1.0)


@given(angle, angle)
def test_euler_round_trip_at_poles(rot, psi):
    for t in (0.0, 180.0):
        a = cv.euler_to_matrix(rot, t, psi)
        r2, t2, p2 = cv.matrix_to_euler(a)
        assert r2 == 0.0 and t2 == pytest.approx(t)
        np.testing.assert_allclose(cv.euler_to_matrix(r2, t2, p2), a, atol=1e-9)


def test_euler_known_matrices():
    # A pure rot (= pure psi at tilt 0) of 90 degrees is Rz(90) = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]].
    np.testing.assert_allclose(cv.euler_to_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    # tilt 90 about y: the viewing direction (third row) becomes +x.
    np.testing.assert_allclose(cv.euler_to_matrix(0, 90, 0)[2], [1, 0, 0], atol=1e-15)


@given(angle, tilt, angle)
def test_viewing_direction_is_third_row(rot, t, psi):
    np.testing.assert_allclose(cv.viewing_direction(rot, t), cv.euler_to_matrix(rot, t, psi)[2], atol=1e-12)


@given(angle, tilt, angle)
def test_eman_spider_round_trip(phi, theta, psi):
    back = cv.eman_to_spider(*cv.spider_to_eman(phi, theta, psi))
    np.testing.assert_allclose(cv.euler_to_matrix(*back), cv.euler_to_matrix(phi, theta, psi), atol=1e-9)


@settings(deadline=None)  # the first call imports scipy.spatial
@given(angle, tilt, angle)
def test_axis_angle_round_trip(rot, t, psi):
    a = cv.euler_to_matrix(rot, t, psi)
    np.testing.assert_allclose(cv.axis_angle_to_matrix(cv.matrix_to_axis_angle(a)), a, atol=1e-9)


def test_axis_angle_matches_pyem_expmap():
    # pyem's expmap(e) for e = theta*z gives [[c, s, 0], [-s, c, 0], [0, 0, 1]] = RELION Rz(theta).
    theta = 0.3
    np.testing.assert_allclose(cv.axis_angle_to_matrix([0, 0, theta]), cv.euler_to_matrix(np.rad2deg(theta), 0, 0),
                               atol=1e-12)


@given(angle, shift, shift, st.integers(0, 1))
def test_align2d_relion_round_trip(alpha, sx, sy, mirror):
    a, x, y, m = cv.relion_to_align2d(*cv.align2d_to_relion(alpha, sx, sy, mirror))
    assert int(m) == mirror
    np.testing.assert_allclose([x, y], [sx, sy], atol=1e-9)
    assert abs(float(cv.wrap_degrees(a - alpha))) < 1e-9


@given(angle, shift, shift, st.integers(0, 1), st.floats(-40, 40), st.floats(-40, 40))
def test_align2d_relion_maps_the_same_points(alpha, sx, sy, mirror, x, y):
    """SPHIRE maps image point q to X; RELION must put reference point X back at q."""
    a = np.deg2rad(alpha)
    r = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    q = np.array([x, y])
    big_x = r @ q + [sx, sy]
    if mirror:
        big_x[0] = -big_x[0]
    psi, t, ox, oy = cv.align2d_to_relion(alpha, sx, sy, mirror)
    a3 = cv.euler_to_matrix(0.0, t, psi)
    q_relion = (a3 @ np.array([big_x[0], big_x[1], 0.0]))[:2] - [ox, oy]
    np.testing.assert_allclose(q_relion, q, atol=1e-9)


@given(st.integers(0, 10**7), st.text(alphabet="abc/_.-", min_size=1, max_size=20))
def test_image_name_round_trip(index, path):
    assert cv.parse_image_name(cv.format_image_name(index, path)) == (index, path.strip())


def test_image_name_errors():
    with pytest.raises(ValueError):
        cv.parse_image_name("0@stack.mrcs")
    with pytest.raises(ValueError):
        cv.parse_image_name("x@y@z")


@given(st.floats(1000, 50000), st.floats(1000, 50000), st.floats(0, 179.999))
def test_defocus_round_trip(u, v, ang):
    back = cv.eman_to_relion_defocus(*cv.relion_to_eman_defocus(u, v, ang))
    np.testing.assert_allclose(back[:2], [u, v], rtol=1e-12)
    assert abs(((back[2] - ang) + 90) % 180 - 90) < 1e-9


@given(st.floats(1000, 50000), st.floats(1000, 50000), st.floats(0, 180), st.floats(-np.pi, np.pi))
@settings(max_examples=200)
def test_defocus_same_astigmatism_profile(u, v, ang, phi):
    """RELION's U cos^2 + V sin^2 equals SPHIRE's defocus - dfdiff/2 sin(2(phi + dfang)), the defocus at
    azimuth phi in SPHIRE's own code (sphire 1.4.2 ``sp_morphology.rotavg_ctf``: ``dfa = defc - astigmamp/2 *
    sin(2 * (atan2(y, x) + angrad))``) for the values ``sp_relion2sphire`` writes (isavar's mapping)."""
    d, dd, dfang = cv.relion_to_eman_defocus(u, v, ang)
    relion = u * np.cos(phi - np.deg2rad(ang)) ** 2 + v * np.sin(phi - np.deg2rad(ang)) ** 2
    eman = (d - dd / 2 * np.sin(2 * (phi + np.deg2rad(dfang)))) * 1e4
    assert relion == pytest.approx(eman, rel=1e-9, abs=1e-6)


@given(st.floats(0.1, 10), st.floats(-1, 1), st.floats(0, 180), st.floats(0, 200), st.floats(0, 100),
       st.floats(60, 300), st.floats(0, 5), st.floats(0.3, 10))
def test_eman2_ctf_string_round_trip(d, dd, ang, b, amp, kv, cs, apix):
    text = cv.format_eman2_ctf(defocus_um=d, dfdiff_um=dd, dfang_deg=ang, bfactor_A2=b, ampcont_percent=amp,
                               voltage_kV=kv, cs_mm=cs, apix_A=apix)
    parsed = cv.parse_eman2_ctf(text)
    np.testing.assert_allclose(list(parsed.values()), [d, dd, ang, b, amp, kv, cs, apix], rtol=1e-7, atol=1e-12)


def test_eman2_ctf_string_reads_eman_output():
    # As EMAN2's EMAN2Ctf::to_string writes it (4 significant digits, background and SNR curves).
    parsed = cv.parse_eman2_ctf("E2.05 0.1 15 0 10 300 2.7 1.3 -1 2,0.5,0.4 1,0.9")
    assert parsed["defocus_um"] == 2.05 and parsed["apix_A"] == 1.3 and parsed["ampcont_percent"] == 10
    with pytest.raises(ValueError):
        cv.parse_eman2_ctf("X1 2 3")


def test_amplitude_contrast_units():
    assert cv.ampcont_percent_to_fraction(10) == pytest.approx(0.1)
    assert cv.ampcont_fraction_to_percent(0.07) == pytest.approx(7)


def test_wavelength_300kv():
    assert cv.electron_wavelength_A(300) == pytest.approx(0.019687, rel=1e-4)


def test_grid_centre():
    assert cv.grid_centre(64) == 32 and cv.grid_centre(65) == 32


@given(st.floats(1000, 50000), st.floats(1000, 50000), st.floats(0, 180), st.floats(-np.pi, np.pi))
@settings(max_examples=100)
def test_eman2_own_astigmatism_definition_is_not_sphires(u, v, ang, phi):
    """EMAN2's ``EMAN2Ctf::df(a) = defocus + dfdiff/2 cos(2 (a - dfang))`` (libEM/ctf.cpp: the astigmatism
    correction ``-dfdiff/2*cos(2.0*a-2.0*M_PI/180.0*dfang)``; dfang = major axis, counter-clockwise from x)
    matches RELION with ``dfdiff = U - V, dfang = angle`` (EMAN2's own EMX export writes U = defocus +
    dfdiff/2 at dfang), not with SPHIRE's mapping: the two programs read the same header differently."""
    relion = u * np.cos(phi - np.deg2rad(ang)) ** 2 + v * np.sin(phi - np.deg2rad(ang)) ** 2
    d = (u + v) / 2
    eman2_native = d + (u - v) / 2 * np.cos(2 * (phi - np.deg2rad(ang)))
    assert relion == pytest.approx(eman2_native, rel=1e-9, abs=1e-6)
    sd, sdd, sdfang = cv.relion_to_eman_defocus(u, v, ang)
    eman2_of_sphire_values = (sd + sdd / 2 * np.cos(2 * (phi - np.deg2rad(sdfang)))) * 1e4
    # same mean and amplitude, axes at -a - 45 degrees: equal only on a measure-zero set of azimuths
    mirrored = u * np.cos(-phi - np.pi / 4 - np.deg2rad(ang)) ** 2 + v * np.sin(-phi - np.pi / 4 - np.deg2rad(ang)) ** 2
    assert eman2_of_sphire_values == pytest.approx(mirrored, rel=1e-9, abs=1e-6)
