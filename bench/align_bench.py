"""Micro-benchmark of the polar 2-D aligner (isavar.core.align2d) — the hot loop of ISAC2.

Compares, on the same synthetic data and the default ISAC geometry (76 px images, rings 1..29,
lcirc = 4024, maxrin = 256, +-1 px translations = 9 trials):

* ``isavar``   — :func:`isavar.core.align2d.align_to_references` (batched numpy/BLAS/pocketfft, float32);
* ``C scalar`` — a from-spec scalar C implementation written the way SPHIRE's C++ works (per image, per
  translation: bilinear ring sampling, ring normalisation, one real FFT per ring; per reference: spectrum
  accumulation and two inverse real FFTs of length maxrin, peak search, 7-point parabola), compiled here
  with ``cc -O2`` and called through ctypes. Trig tables are precomputed (SPHIRE is not faster than this);
  it is also an independent check of the results (scores and angles must agree);
* ``numpy per-image`` — a straightforward per-image/per-translation/per-reference numpy transcription
  (``polar_transform`` + ``rotational_correlation``), on a few images only;
* the spec's cost model (isac2.md §11.2): ``P = 1.4e5`` flop per (image, translation) and ``C = 2.7e4`` flop
  per (image, translation, reference); "model GFLOP/s" = model flops / measured CPU time.

Times are CPU seconds of this process (``time.process_time``), minimum over repeats, single thread
(run with ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``). Usage::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python bench/align_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from isavar.core.align2d import SpectraCache, align_to_reference, align_to_references, prepare_references
from isavar.core.polar import normalize_rings, polar_grid, polar_transform, rotational_correlation

N = 76
OU = 29
P_FLOP = 1.4e5
C_FLOP = 2.7e4

C_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
static double *TWC = 0, *TWS = 0;
static int TW_N = 0;
static void twiddles(int n) {
    if (TW_N == n) return;
    free(TWC); free(TWS);
    TWC = malloc(sizeof(double) * n); TWS = malloc(sizeof(double) * n);
    for (int k = 0; k < n; k++) { TWC[k] = cos(2.0 * M_PI * k / n); TWS[k] = sin(2.0 * M_PI * k / n); }
    TW_N = n;
}
static void cfft(double *re, double *im, int n, int sign) {
    int j = 0;
    for (int i = 0; i < n - 1; i++) {
        if (i < j) { double t = re[i]; re[i] = re[j]; re[j] = t; t = im[i]; im[i] = im[j]; im[j] = t; }
        int k = n >> 1;
        while (k <= j) { j -= k; k >>= 1; }
        j += k;
    }
    for (int len = 2; len <= n; len <<= 1) {
        int stride = TW_N / len;
        for (int i = 0; i < n; i += len) {
            for (int k = 0; k < len / 2; k++) {
                double cr = TWC[k * stride], ci = sign * TWS[k * stride];
                int a = i + k, b = i + k + len / 2;
                double tr = re[b] * cr - im[b] * ci, ti = re[b] * ci + im[b] * cr;
                re[b] = re[a] - tr; im[b] = im[a] - ti; re[a] += tr; im[a] += ti;
            }
        }
    }
}
static void rfft(const double *x, int n, double *Xr, double *Xi, double *wr, double *wi) {
    int h = n / 2;
    for (int k = 0; k < h; k++) { wr[k] = x[2 * k]; wi[k] = x[2 * k + 1]; }
    cfft(wr, wi, h, -1);
    for (int m = 0; m <= h; m++) {
        int a = m % h, b = (h - m) % h;
        double zr = wr[a], zi = wi[a], cr = wr[b], ci = -wi[b];
        double er = 0.5 * (zr + cr), ei = 0.5 * (zi + ci);
        double orr = 0.5 * (zi - ci), oi = -0.5 * (zr - cr);
        int t = (m * (TW_N / n)) % TW_N;
        double c = TWC[t], s = -TWS[t];
        Xr[m] = er + c * orr - s * oi; Xi[m] = ei + c * oi + s * orr;
    }
}
static void irfft(const double *Xr, const double *Xi, int n, double *x, double *wr, double *wi) {
    int h = n / 2;
    for (int m = 0; m < h; m++) {
        double ar = Xr[m], ai = Xi[m], br = Xr[h - m], bi = -Xi[h - m];
        double er = ar + br, ei = ai + bi, dr = ar - br, di = ai - bi;
        int t = (m * (TW_N / n)) % TW_N;
        double c = TWC[t], s = TWS[t];
        double orr = dr * c - di * s, oi = dr * s + di * c;
        wr[m] = er - oi; wi[m] = ei + orr;
    }
    cfft(wr, wi, h, +1);
    for (int k = 0; k < h; k++) { x[2 * k] = wr[k]; x[2 * k + 1] = wi[k]; }
}
static double prb7(const double *y) {
    double lin = (-3 * y[0] - 2 * y[1] - y[2] + y[4] + 2 * y[5] + 3 * y[6]) / 28.0;
    double quad = (5 * y[0] - 3 * y[2] - 4 * y[3] - 3 * y[4] + 5 * y[6]) / 84.0;
    return quad != 0.0 ? -lin / (2.0 * quad) : 0.0;
}
static void polar(const float *img, int nx, double cx, double cy, int nring, const int *rad, const int *nr,
                  const int *off, double *out) {
    for (int i = 0; i < nring; i++) {
        int stride = TW_N / nr[i];
        for (int j = 0; j < nr[i]; j++) {
            double x = cx + rad[i] * TWS[j * stride], y = cy + rad[i] * TWC[j * stride];
            int x0 = (int)x, y0 = (int)y;
            double u = x - x0, v = y - y0;
            const float *p = img + (size_t)y0 * nx + x0;
            out[off[i] + j] = (1 - v) * ((1 - u) * p[0] + u * p[1]) + v * ((1 - u) * p[nx] + u * p[nx + 1]);
        }
    }
}
/* out[(image, ref)] = (score, angle deg, ix, iy, mirror); translations k = -xr..xr, step 1 */
int align(const float *imgs, int n, int nx, const float *refs, int nref, int xr, int ou, int normalize,
          double *out) {
    int nring = ou, rad[512], nr[512], off[513], lc = 0, maxrin;
    for (int i = 0; i < nring; i++) {
        rad[i] = i + 1;
        int jp = (int)(2.0 * M_PI * rad[i] + 0.5), p = 1;
        while (p <= jp) p <<= 1;
        nr[i] = p; off[i] = lc; lc += p;
    }
    off[nring] = lc; maxrin = nr[nring - 1];
    twiddles(maxrin);
    double *w = malloc(sizeof(double) * nring), *sw = malloc(sizeof(double) * nring);
    for (int i = 0; i < nring; i++) {
        w[i] = rad[i] * (2 * M_PI / nr[i]) * ((double)maxrin / nr[i]);
        sw[i] = 2 * M_PI * rad[i] / nr[i];
    }
    int nf = maxrin / 2 + 1, fl = lc / 2 + nring;
    double *ar = malloc(sizeof(double) * fl * nref), *ai = malloc(sizeof(double) * fl * nref);
    double *br = malloc(sizeof(double) * fl), *bi = malloc(sizeof(double) * fl);
    double *pol = malloc(sizeof(double) * lc), *wr = malloc(sizeof(double) * maxrin), *wi = malloc(sizeof(double) * maxrin);
    double *tr = malloc(sizeof(double) * nf), *ti = malloc(sizeof(double) * nf);
    double *qr = malloc(sizeof(double) * nf), *qi = malloc(sizeof(double) * nf);
    double *cs = malloc(sizeof(double) * maxrin), *cm = malloc(sizeof(double) * maxrin);
    double c0 = nx / 2;
    for (int k = 0; k < nref; k++) {
        polar(refs + (size_t)k * nx * nx, nx, c0, c0, nring, rad, nr, off, pol);
        for (int i = 0; i < nring; i++) {
            int fo = off[i] / 2 + i, h = nr[i] / 2;
            rfft(pol + off[i], nr[i], ar + (size_t)k * fl + fo, ai + (size_t)k * fl + fo, wr, wi);
            for (int m = 0; m <= h; m++) {
                double f = (m == h && nr[i] < maxrin) ? 0.5 * w[i] : w[i];
                ar[(size_t)k * fl + fo + m] *= f; ai[(size_t)k * fl + fo + m] *= f;
            }
        }
    }
    for (int im = 0; im < n; im++) {
        const float *img = imgs + (size_t)im * nx * nx;
        for (int k = 0; k < nref; k++) out[((size_t)im * nref + k) * 5] = -1e300;
        for (int iy = -xr; iy <= xr; iy++) for (int ix = -xr; ix <= xr; ix++) {
            polar(img, nx, c0 + ix, c0 + iy, nring, rad, nr, off, pol);
            if (normalize) {
                double s1 = 0, s2 = 0, swt = 0;
                for (int i = 0; i < nring; i++) {
                    for (int j = 0; j < nr[i]; j++) { double v = pol[off[i] + j]; s1 += sw[i] * v; s2 += sw[i] * v * v; }
                    swt += sw[i] * nr[i];
                }
                double mean = s1 / swt, sd = sqrt(s2 / swt - mean * mean);
                for (int j = 0; j < lc; j++) pol[j] = (pol[j] - mean) / sd;
            }
            for (int i = 0; i < nring; i++) rfft(pol + off[i], nr[i], br + off[i] / 2 + i, bi + off[i] / 2 + i, wr, wi);
            for (int k = 0; k < nref; k++) {
                const double *akr = ar + (size_t)k * fl, *aki = ai + (size_t)k * fl;
                memset(tr, 0, sizeof(double) * nf); memset(ti, 0, sizeof(double) * nf);
                memset(qr, 0, sizeof(double) * nf); memset(qi, 0, sizeof(double) * nf);
                for (int i = 0; i < nring; i++) {
                    int fo = off[i] / 2 + i;
                    for (int m = 0; m <= nr[i] / 2; m++) {
                        double xr_ = akr[fo + m], xi_ = aki[fo + m], yr = br[fo + m], yi = bi[fo + m];
                        tr[m] += xr_ * yr + xi_ * yi; ti[m] += xi_ * yr - xr_ * yi;
                        qr[m] += xr_ * yr - xi_ * yi; qi[m] -= xi_ * yr + xr_ * yi;
                    }
                }
                ti[0] = qi[0] = ti[nf - 1] = qi[nf - 1] = 0;
                irfft(tr, ti, maxrin, cs, wr, wi);
                irfft(qr, qi, maxrin, cm, wr, wi);
                int js = 0, jm = 0;
                for (int j = 1; j < maxrin; j++) { if (cs[j] >= cs[js]) js = j; if (cm[j] >= cm[jm]) jm = j; }
                double ys[7], ym[7];
                for (int d = -3; d <= 3; d++) {
                    ys[d + 3] = cs[(js + d + maxrin) % maxrin]; ym[d + 3] = cm[(jm + d + maxrin) % maxrin];
                }
                double qn = cs[js] / maxrin, qm = cm[jm] / maxrin;
                double *o = out + ((size_t)im * nref + k) * 5;
                double q = qn >= qm ? qn : qm;
                if (q >= o[0]) {
                    double pos = qn >= qm ? js + prb7(ys) : jm + prb7(ym);
                    o[0] = q; o[1] = fmod(360.0 * pos / maxrin + 360.0, 360.0); o[2] = ix; o[3] = iy;
                    o[4] = qn >= qm ? 0 : 1;
                }
            }
        }
    }
    free(w); free(sw); free(ar); free(ai); free(br); free(bi); free(pol); free(wr); free(wi);
    free(tr); free(ti); free(qr); free(qi); free(cs); free(cm);
    return 0;
}
"""


def build_c_baseline():
    """Compile the scalar baseline; None (with a message) when no C compiler is available."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        print("no C compiler: skipping the scalar C baseline", file=sys.stderr)
        return None
    tmp = tempfile.mkdtemp(prefix="isavar_align_bench_")
    src = os.path.join(tmp, "baseline.c")
    lib = os.path.join(tmp, "baseline.so")
    with open(src, "w") as fh:
        fh.write(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src, "-lm"], check=True)
    dll = ctypes.CDLL(lib)
    dll.align.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return dll


def c_align(dll, images, refs, xr, normalize):
    images = np.ascontiguousarray(images, np.float32)
    refs = np.ascontiguousarray(refs, np.float32)
    out = np.zeros((images.shape[0], refs.shape[0], 5))
    dll.align(images.ctypes.data, images.shape[0], images.shape[1], refs.ctypes.data, refs.shape[0], xr, OU,
              int(normalize), out.ctypes.data)
    return out


def numpy_per_image(images, refs, grid, xr, normalize):
    """Straightforward reference: loops over images, translations and references (best score only)."""
    ref_polar = [polar_transform(r, grid) for r in refs]
    best = np.full((len(images), len(refs)), -np.inf)
    for i, img in enumerate(images):
        for iy in range(-xr, xr + 1):
            for ix in range(-xr, xr + 1):
                b = polar_transform(img, grid, shifts=[[ix, iy]])[0]
                if normalize:
                    b = normalize_rings(b, grid)
                for k, a in enumerate(ref_polar):
                    c, c_m = rotational_correlation(b, a, grid)
                    best[i, k] = max(best[i, k], c.max(), c_m.max())
    return best


def cpu_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def blobs(rng, n):
    y, x = np.mgrid[:N, :N] - N // 2
    out = np.zeros((n, N, N), np.float32)
    for i in range(n):
        for _ in range(7):
            cx, cy = rng.uniform(-12, 12, 2)
            s = rng.uniform(2.0, 5.0)
            out[i] += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    grid = polar_grid(1, OU)
    repeats = 2 if args.quick else 3
    dll = build_c_baseline()
    # (label, n_images, n_refs, xr, ring normalisation)
    cases = [
        ("within-group pass (1 ref)", 64 if args.quick else 200, 1, 1, False),
        ("EQK, K = 10", 24 if args.quick else 64, 10, 1, True),
        ("EQK, K = 50", 8 if args.quick else 24, 50, 1, True),
        ("EQK, K = 250", 2 if args.quick else 6, 250, 1, True),
    ]
    print("| case | n_img x shifts x refs | isavar us/pair | C scalar us/pair | speed-up vs C | "
          "model GFLOP/s isavar | model GFLOP/s C | max rel score diff vs C |")
    print("|---|---|---|---|---|---|---|---|")
    for label, n, k, xr, norm in cases:
        n_sh = (2 * xr + 1) ** 2
        images = blobs(rng, n) + 0.7 * rng.standard_normal((n, N, N)).astype(np.float32)
        refs = blobs(rng, k)
        prep = prepare_references(refs, grid)
        t_ours = cpu_time(lambda: align_to_references(images, prep, grid, x_range=xr, y_range=xr, step=1,
                                                      normalize_images=norm), repeats)
        ours = align_to_references(images, prep, grid, x_range=xr, y_range=xr, step=1, normalize_images=norm)
        flops = n * n_sh * (P_FLOP + k * C_FLOP)
        pairs = n * n_sh * k
        if dll is not None:
            t_c = cpu_time(lambda: c_align(dll, images, refs, xr, norm), repeats)
            ref = c_align(dll, images, refs, xr, norm)
            diff = np.abs(ours.score - ref[..., 0]).max() / np.abs(ref[..., 0]).max()
            c_cols = (f"{t_c / pairs * 1e6:.2f}", f"{t_c / t_ours:.1f}x", f"{flops / t_c / 1e9:.2f}", f"{diff:.1e}")
        else:
            c_cols = ("-", "-", "-", "-")
        print(f"| {label} | {n} x {n_sh} x {k} | {t_ours / pairs * 1e6:.2f} | {c_cols[0]} | {c_cols[1]} | "
              f"{flops / t_ours / 1e9:.2f} | {c_cols[2]} | {c_cols[3]} |")
    # within-group style: repeated passes of the same images against one reference, with and without cache
    n, passes = (48 if args.quick else 200), 12
    ref = blobs(rng, 1)[0]
    images = np.stack([np.roll(ref, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) for _ in range(n)])
    images = images + 0.7 * rng.standard_normal(images.shape).astype(np.float32)

    def run_passes(cache):
        cur = np.zeros((n, 4))
        for it in range(passes):
            cur = align_to_reference(images, ref, grid, x_range=1, y_range=1, step=1, initial_params=cur,
                                     delta=90.0 if it % 4 == 0 else 0.0, cache=cache).params

    t_plain = cpu_time(lambda: run_passes(None), repeats)
    caches = []
    t_cache = cpu_time(lambda: run_passes(caches.append(SpectraCache()) or caches[-1]), repeats)
    hit = caches[-1].hits / max(1, caches[-1].hits + caches[-1].misses)
    rows = passes * n * 9
    line = (f"\nwithin-group passes ({n} images x 9 shifts x {passes} passes, 1 ref): isavar "
            f"{t_plain / rows * 1e6:.1f} us/(image, shift); with SpectraCache {t_cache / rows * 1e6:.1f} "
            f"(hit rate {hit:.2f})")
    if dll is not None:
        t_c = cpu_time(lambda: c_align(dll, images, ref[None], 1, False), repeats)
        line += f"; C scalar {t_c / (n * 9) * 1e6:.1f} us/(image, shift)"
    print(line)
    # straightforward numpy per-image loop on a few images
    n, k = 2, 10
    images = blobs(rng, n)
    refs = blobs(rng, k)
    t_np = cpu_time(lambda: numpy_per_image(images, refs, grid, 1, True), 1)
    t_ours = cpu_time(lambda: align_to_references(images, refs, grid, x_range=1, y_range=1, step=1), repeats)
    slow = numpy_per_image(images, refs, grid, 1, True)
    fast = align_to_references(images, refs, grid, x_range=1, y_range=1, step=1)
    print(f"\nnumpy per-image loop ({n} images x 9 shifts x {k} refs): {t_np / (n * 9 * k) * 1e6:.1f} us/pair, "
          f"isavar (incl. reference preparation) {t_ours / (n * 9 * k) * 1e6:.1f} us/pair "
          f"({t_np / t_ours:.0f}x); max |score diff| {np.abs(slow - fast.score).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
