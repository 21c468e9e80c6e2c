"""Could rotation- and mirror-invariant features pre-select the EQK candidates? (measurement, not used by isavar)

Per image (at its current centre) and per reference: the amplitudes |FFT along the angle| of every ring at
angular frequencies 1..8, normalised (232 numbers); one matrix product scores every pair. The script asks
how often the coarse score's best reference (what the candidate search uses today) is among the L best
by this invariant score. Paths are those of the 8th session's 50,000-particle run (edit them):

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_invariant_prefilter.py 20000
"""
import sys, time, numpy as np
sys.path.insert(0, '/work/main/src')
from isavar.isac.params import Isac2Params
from isavar.isac import generation as G, _ops
from isavar.isac.run import make_grid, subset_images
from isavar.isac.working import MappedStack, resolve
from isavar.core import align2d as A
from isavar.core.polar import ring_spectra
n = int(sys.argv[1]); MF = 8
st = MappedStack('/tmp/s15/n50k/isac2_50000/stack_ali2d.npy')
ck = np.load('/tmp/s15/n50k/isac2_50000/checkpoints/main_001_end.npz')
p = Isac2Params(radius=50, CTF=True, rand_seed=1); grid = make_grid(p)
K = n // p.img_per_grp
imgs = subset_images(st, np.arange(n), p)
refs = np.array(ck['averages'][:K], np.float32)
params = np.array(ck['params'][:n]); params[params[:, 3] < 0] = 0
mask = _ops.circle(imgs.shape[-1], p.target_radius)
nrefs = G.normalise_references(_ops.tanh_lowpass(refs, 0.3, p.FF), mask)
prep = _ops.prepare(nrefs, grid, band_tol=p.band_tol)
def feats(x, par):
    x = np.asarray(x, np.float32); m = len(x); box = x.shape[-1]
    s = A.particle_centres(par, m, box, grid.last_ring, out_of_range="reset")
    z = np.zeros(1, np.int64)
    polar = A._gather_polar(x.reshape(-1), box, np.arange(m), box // 2 + s[:, 0], box // 2 + s[:, 1], grid, z, z).reshape(m, grid.lcirc)
    spec = ring_spectra(polar, grid)
    parts = []
    for sp in spec:
        a = np.abs(sp[:, :, 1:MF + 1]) ** 2
        parts.append(np.pad(a, ((0, 0), (0, 0), (0, MF - a.shape[2]))))
    f = np.concatenate(parts, axis=1).reshape(m, -1)   # (m, rings*MF)
    f = np.sqrt(f)
    f -= f.mean(1, keepdims=True); f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    return f.astype(np.float32)
t = time.process_time()
fr = feats(nrefs, np.zeros((K, 4)))
coarse = np.empty((n, K), np.float32); fi = np.empty((n, fr.shape[1]), np.float32)
for s0 in range(0, n, 512):
    x = resolve(imgs.for_task(np.arange(s0, min(n, s0 + 512))))
    coarse[s0:s0 + len(x)] = _ops.coarse_scores(x, _ops.truncate(prep, 8), params[s0:s0 + len(x)], 8)
    fi[s0:s0 + len(x)] = feats(x, params[s0:s0 + len(x)])
t1 = time.process_time()
inv = fi @ fr.T
t2 = time.process_time()
print("K", K, "features", fr.shape[1], "coarse+feat CPU", round(t1 - t, 1), "GEMM CPU", round(t2 - t1, 2))
ctop = np.argsort(-coarse, 1)[:, :8]
itop = np.argsort(-inv, 1)
for L in (8, 16, 24, 32, 48):
    s = set()
    hit1 = np.mean([ctop[i, 0] in itop[i, :L] for i in range(n)])
    hit8 = np.mean([len(np.intersect1d(ctop[i], itop[i, :L])) / 8 for i in range(n)])
    print(f"invariant top-{L}: coarse best inside {hit1:.4f}, coarse top-8 inside {hit8:.4f}")
