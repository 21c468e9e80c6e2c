"""Could a two-level search over the references pre-select the EQK candidates? (measurement, not used by isavar)

The K references are grouped by their mutual coarse scores (farthest-point medoids, then 10 rounds of
medoid updates); an image would be scored against the group medoids, then against the members of its g best
groups. The script reports how often the coarse score's best reference lies in those groups and how many
coarse pairs per image that costs. Paths are those of the 8th session's 50,000-particle run (edit them):

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_twolevel_prefilter.py 50000 24
"""
import sys, time, numpy as np
sys.path.insert(0, '/work/main/src')
from isavar.isac.params import Isac2Params
from isavar.isac import generation as G, _ops
from isavar.isac.run import make_grid, subset_images
from isavar.isac.working import MappedStack, resolve
n = int(sys.argv[1]); NG = int(sys.argv[2])
st = MappedStack('/tmp/s15/n50k/isac2_50000/stack_ali2d.npy')
ck = np.load('/tmp/s15/n50k/isac2_50000/checkpoints/main_001_end.npz')
p = Isac2Params(radius=50, CTF=True, rand_seed=1); grid = make_grid(p)
K = n // p.img_per_grp
imgs = subset_images(st, np.arange(n), p)
refs = np.array(ck['averages'][:K], np.float32)
if len(refs) < K:
    refs = np.concatenate([refs, np.array(imgs.take(np.arange(K - len(refs))), np.float32)])
params = np.array(ck['params'][:n]); params[params[:, 3] < 0] = 0
mask = _ops.circle(imgs.shape[-1], p.target_radius)
nrefs = G.normalise_references(_ops.tanh_lowpass(refs, 0.3, p.FF), mask)
prep = _ops.truncate(_ops.prepare(nrefs, grid, band_tol=p.band_tol), 8)
coarse = np.empty((n, K), np.float32)
for s0 in range(0, n, 512):
    x = resolve(imgs.for_task(np.arange(s0, min(n, s0 + 512))))
    coarse[s0:s0 + len(x)] = _ops.coarse_scores(x, prep, params[s0:s0 + len(x)], 8)
# reference-reference coarse similarity, k-medoids-like grouping (greedy farthest-point medoids + assignment)
rr = _ops.coarse_scores(nrefs, prep, np.zeros((K, 4)), 8)
rr = 0.5 * (rr + rr.T)
rng = np.random.default_rng(0)
med = [int(rng.integers(K))]
for _ in range(NG - 1):
    med.append(int(np.argmin(rr[:, med].max(1))))
for _ in range(10):
    lab = np.argmax(rr[:, med], 1)
    med = [int(np.flatnonzero(lab == g)[np.argmax(rr[np.ix_(lab == g, lab == g)].sum(1))]) for g in range(NG) if (lab == g).any()]
lab = np.argmax(rr[:, med], 1)
sizes = np.bincount(lab, minlength=len(med))
print("K", K, "groups", len(med), "sizes", sizes.min(), sizes.mean(), sizes.max())
best = np.argmax(coarse, 1)
top8 = np.argsort(-coarse, 1)[:, :8]
gs = coarse[:, med]                                      # image vs medoid scores (would be computed: NG per image)
order = np.argsort(-gs, 1)
for g in (2, 3, 4, 6, 8):
    chosen = order[:, :g]
    ok_best = np.mean([lab[best[i]] in chosen[i] for i in range(n)])
    ok8 = np.mean([np.isin(lab[top8[i]], chosen[i]).mean() for i in range(n)])
    pairs = len(med) + np.mean([sizes[chosen[i]].sum() for i in range(0, n, 50)])
    print(f"top {g} groups: coarse best inside {ok_best:.4f}, coarse top-8 inside {ok8:.4f}, coarse pairs per image {pairs:.0f} of {K}")
