"""Probes behind the conditions stage's "tried, not shipped" rows (models/README.md), on the stage's cached
embeddings and folds: `textmap` (contrastive text map vs ridge, K = 0), `lambda` (ridge lambda sweep), `refer`
(task-adaptive referral vs the fixed calibrated threshold, utility +1 correct / -1 wrong / 0 referred),
`centre` (text-only K = 0 with the task's projected descriptions centred, a dermoscopic domain shift, or a
dermoscopy-only map; on each fold's own encoder, as the fold check).
Base classes only (conditions.load_conditions). Run after `run.py --stage conditions` has filled --work:

    models/train/.venv/bin/python models/train/experiments/conditions_probe.py textmap|lambda|refer
"""
import sys, os, json, time, logging
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import numpy as np, torch, torch.nn.functional as F
from sgps_train import conditions as C, episodes, meta
logging.basicConfig(level=logging.WARNING)
here = HERE
desc = json.loads((here / "descriptions.json").read_text())["base"]
emb, texts, _ = C.load_conditions(HERE.parent, HERE.parent.parent.parent / "shared" / "data", here / "out", desc, False, 0)
classes = sorted(emb); folds = C.make_folds(classes)

def pools_of(cls):
    P = {"derm": [c for c in cls if C.is_dermoscopic(c)]}
    for c in cls:
        if not C.is_dermoscopic(c):
            P.setdefault(c.split("/")[0], []).append(c)
    return {k: v for k, v in P.items() if len(v) >= 2}

def fit_contrastive(g, tr, trt, steps=1500, lr=1e-3, s=10.0, wd=1e-4, seed=0, per=4, B=32):
    C.fit_text_proj(g, tr, trt)
    rng = np.random.default_rng(seed)
    lin = g.text_proj
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    P = pools_of(list(tr)); names = list(P)
    E = {c: torch.from_numpy(v).float() for c, v in tr.items()}
    T = {c: torch.from_numpy(v).float() for c, v in trt.items()}
    for step in range(steps):
        pool = P[names[rng.integers(len(names))]]
        cs = list(rng.choice(pool, size=min(B, len(pool)), replace=False))
        t = torch.stack([T[c][rng.integers(len(T[c]))] for c in cs])
        w = F.normalize(lin(t), dim=-1)
        xs, ys = [], []
        for i, c in enumerate(cs):
            idx = rng.choice(len(E[c]), size=per, replace=len(E[c]) < per)
            xs.append(E[c][idx]); ys += [i] * per
        x = torch.cat(xs); y = torch.tensor(ys)
        loss = F.cross_entropy(s * x @ w.T, y)
        opt.zero_grad(); loss.backward(); opt.step()
    return g

def zs(g, held, ht, n_ep=300, fi=0):
    out = {}
    for fam, cls, n in (("derm", [c for c in held if C.is_dermoscopic(c)], 4), ("skin", [c for c in held if c.split('/')[0] in C.SKIN], 5)):
        out[fam] = episodes.evaluate(g, held, ht, cls, n, 0, 15, n_ep, True, seed=500 + fi)["acc"]
    return out

def l2(x): return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

def family(held, fam):
    """The held-out classes of an episode family: dermoscopic, or every skin condition."""
    return [c for c in held if (C.is_dermoscopic(c) if fam == "derm" else c.split("/")[0] in C.SKIN)]

def ridge_to_means(E, feats, cls, lam):
    """Ridge map (with bias) from each class's text features to its normalised image mean."""
    means = meta.class_means({c: E[c] for c in cls})
    X = np.concatenate([feats[c] for c in cls]).astype(np.float64)
    Y = np.concatenate([np.repeat(means[c][None], len(feats[c]), 0) for c in cls]).astype(np.float64)
    return meta.ridge(X, Y, lam)

def queries(E, cls, n, rng, per=15):
    """One K = 0 episode's classes and its L2-normalised queries (up to `per` per class) with labels."""
    chosen = list(rng.choice(cls, size=n, replace=False))
    q, y = [], []
    for i, c in enumerate(chosen):
        idx = rng.choice(len(E[c]), size=min(per, len(E[c])), replace=False)
        q.append(E[c][idx]); y += [i] * len(idx)
    return chosen, l2(np.concatenate(q)), np.asarray(y)

mode = sys.argv[1] if len(sys.argv) > 1 else "textmap"
if mode == "textmap":
    res = {}
    t0 = time.time()
    for fi, fold in enumerate(folds):
        held = {c: emb[c] for c in fold}; ht = {c: texts[c] for c in fold}
        tr = {c: emb[c] for c in classes if c not in fold}; trt = {c: texts[c] for c in tr}
        for name, fn in (("ridge", lambda g: C.fit_text_proj(g, tr, trt)),
                         ("contrastive", lambda g: fit_contrastive(g, tr, trt)),
                         ("contrastive_s20", lambda g: fit_contrastive(g, tr, trt, s=20.0)),
                         ("contrastive_lr3e-4", lambda g: fit_contrastive(g, tr, trt, lr=3e-4))):
            g = C.make_g(C.CONFIGS["imprinting"], 1280); fn(g); g.eval()
            r = zs(g, held, ht, fi=fi)
            res.setdefault(name, []).append(r)
            print(fi, name, {k: round(v, 4) for k, v in r.items()}, round(time.time() - t0), flush=True)
    for name, rs in res.items():
        d = np.mean([r["derm"] for r in rs]); s = np.mean([r["skin"] for r in rs])
        print(f"{name}: derm_0 {d:.4f} skin_0 {s:.4f} mean {(d+s)/2:.4f}")
elif mode == "lambda":
    for lam in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0):
        ds, ss = [], []
        for fi, fold in enumerate(folds):
            held = {c: emb[c] for c in fold}; ht = {c: texts[c] for c in fold}
            tr = {c: emb[c] for c in classes if c not in fold}; trt = {c: texts[c] for c in tr}
            g = C.make_g(C.CONFIGS["imprinting"], 1280); C.fit_text_proj(g, tr, trt, lam=lam); g.eval()
            r = zs(g, held, ht, fi=fi); ds.append(r["derm"]); ss.append(r["skin"])
        print(f"lam {lam}: derm_0 {np.mean(ds):.4f} skin_0 {np.mean(ss):.4f} mean {(np.mean(ds)+np.mean(ss))/2:.4f}", [round(d,3) for d in ds], flush=True)
elif mode == "refer":
    from sgps_train.synth import logits
    cfg = C.CONFIGS["text_and_image_delta"]
    
    def episodes_feats(g, embd, txt, cls, n, k, eps, seed, tw=None):
        rng = np.random.default_rng(seed); rows = []
        for _ in range(eps):
            s, qx, y, chosen = episodes.sample_episode(rng, embd, cls, n, k, 15)
            t, tm, tws = episodes.text_for(chosen, txt, rng, True, 384, tw)
            w, b, sc = episodes.run_g(g, s, t, tm, tws)
            p = torch.softmax(logits(torch.from_numpy(qx).float(), w, b, sc), -1).numpy()
            wn = (w / w.norm(dim=-1, keepdim=True)).numpy()
            sim = wn @ wn.T; off = sim[~np.eye(n, dtype=bool)]
            cons = 1.0 if k == 1 else float(np.mean([(s[i] @ (s[i].mean(0) / np.linalg.norm(s[i].mean(0)))).mean() for i in range(n)]))
            pm = p.max(-1); ok = (p.argmax(-1) == y).astype(float)
            srt = np.sort(p, -1); margin = srt[:, -1] - srt[:, -2]
            for j in range(len(y)):
                rows.append([pm[j], margin[j], off.mean(), off.max(), cons, np.log(n), np.log1p(k), ok[j]])
        return np.asarray(rows)
    
    def utility(ok, accept): return float(((2 * ok - 1) * accept).sum() / len(ok))
    
    res = {"fixed": [], "adaptive": [], "none": []}
    for fi, fold in enumerate(folds):
        tr = {c: emb[c] for c in classes if c not in fold}; trt = {c: texts[c] for c in tr}
        held = {c: emb[c] for c in fold}; ht = {c: texts[c] for c in fold}
        g = C.train_g(cfg, tr, trt, False, 0)
        tw = meta.loo_text_weights(tr, trt, C.RIDGE_LAM)
        def fam(embd, txt, tws, seed):
            out = []
            for cl, n in (([c for c in embd if C.is_dermoscopic(c)], 4), ([c for c in embd if c.split('/')[0] in C.SKIN], 5)):
                for k in (1, 3, 5):
                    out.append(episodes_feats(g, embd, txt, cl, min(n, len(cl)), k, 60, seed + k, tws))
            return np.concatenate(out)
        A = fam(tr, trt, tw, 10); B = fam(held, ht, None, 500 + fi)
        # fixed threshold fitted on training classes
        ths = np.linspace(0.2, 0.9, 71)
        th = ths[np.argmax([utility(A[:, -1], A[:, 0] >= t) for t in ths])]
        # adaptive: logistic regression of correctness on (logit p_max, margin, task feats)
        from numpy.linalg import lstsq
        X = lambda M: np.c_[np.log(M[:, 0] / (1 - M[:, 0] + 1e-6)), M[:, 1:7], np.ones(len(M))]
        wlr = np.zeros(X(A).shape[1]); Xa = X(A); ya = A[:, -1]
        for _ in range(300):
            pr = 1 / (1 + np.exp(-Xa @ wlr)); wlr -= 0.5 * Xa.T @ (pr - ya) / len(ya) + 1e-4 * wlr
        acc_b = 1 / (1 + np.exp(-X(B) @ wlr)) >= 0.5
        res["none"].append(utility(B[:, -1], np.ones(len(B), bool)))
        res["fixed"].append(utility(B[:, -1], B[:, 0] >= th))
        res["adaptive"].append(utility(B[:, -1], acc_b))
        print(fi, "th", round(th, 3), {k: round(v[-1], 4) for k, v in res.items()}, "refer fixed %.3f adaptive %.3f" % (1 - (B[:, 0] >= th).mean(), 1 - acc_b.mean()), flush=True)
    print({k: round(float(np.mean(v)), 4) for k, v in res.items()})
elif mode == "centre":
    from sgps_train import supervise
    RIDGE = C.RIDGE_LAM
    views = supervise.fold_views(HERE.parent, HERE.parent.parent.parent / "shared" / "data", here / "out", folds, False, 0)
    def fit(E, cls): return ridge_to_means(E, texts, cls, RIDGE)
    def proj(W, t): return np.c_[t, np.ones(len(t))] @ W
    res = {}
    for fi, fold in enumerate(folds):
        E = views[fi][0]
        tr = [c for c in classes if c not in fold]
        tr_d = [c for c in tr if C.is_dermoscopic(c)]
        W = fit(E, tr); Wd = fit(E, tr_d)
        # dermoscopic domain shift: mean image class mean minus mean projected description, training derm classes
        mi = np.mean([meta.class_means({c: E[c]})[c] for c in tr_d], 0)
        mp = np.mean([proj(W, texts[c]).mean(0) for c in tr_d], 0)
        for fam, n in (("derm", 4), ("skin", 5)):
            cls = family(fold, fam)
            n = min(n, len(cls))
            rng = np.random.default_rng(500 + fi)
            acc = {}
            for _ in range(300):
                chosen, q, y = queries(E, cls, n, rng)
                t = np.stack([texts[c][rng.integers(len(texts[c]))] for c in chosen])
                P = proj(W, t)
                variants = {"ridge": P, "centred": P - P.mean(0, keepdims=True)}
                if fam == "derm":
                    variants["derm_shift"] = P - mp + mi
                    variants["derm_only_map"] = proj(Wd, t)
                    variants["derm_only_centred"] = proj(Wd, t) - proj(Wd, t).mean(0, keepdims=True)
                for name, w in variants.items():
                    acc.setdefault(name, []).append(float(((q @ l2(w).T).argmax(-1) == y).mean()))
            for name, a in acc.items():
                res.setdefault((fam, name), []).append(float(np.mean(a)))
            print(fi, fam, {k: round(float(np.mean(v)), 4) for k, v in acc.items()}, flush=True)
    for (fam, name), v in sorted(res.items()):
        print(f"{fam} {name}: {np.mean(v):.4f} per fold {[round(x, 4) for x in v]}")

elif mode == "bow":
    # text features from the words of the descriptions (TF-IDF over the fold's training descriptions),
    # alone and beside the MiniLM embedding, ridge to class means; K = 0 on each fold's own encoder.
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sgps_train import supervise
    views = supervise.fold_views(HERE.parent, HERE.parent.parent.parent / "shared" / "data", here / "out", folds, False, 0)
    res = {}
    for fi, fold in enumerate(folds):
        E = views[fi][0]
        tr = [c for c in classes if c not in fold]
        vk = eval(os.environ.get("BOW", 'dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True, stop_words="english")'))
        vec = TfidfVectorizer(**vk)
        vec.fit([s for c in tr for s in desc[c]])
        bow = {c: vec.transform(desc[c]).toarray() for c in classes}
        feats = {
            "minilm": lambda c: texts[c],
            "bow": lambda c: bow[c],
            "both_1": lambda c: np.c_[texts[c], bow[c]],
        }
        Ws = {}
        for name, f in feats.items():
            for lam in eval(os.environ.get("LAMS", "(1.0, 3.0)")):
                Ws[f"{name}_l{lam}"] = (f, ridge_to_means(E, {c: f(c) for c in tr}, tr, lam))
        for fam, n in (("derm", 4), ("skin", 5)):
            cls = family(fold, fam)
            n = min(n, len(cls))
            rng = np.random.default_rng(500 + fi)
            acc = {}
            for _ in range(300):
                chosen, q, y = queries(E, cls, n, rng)
                pick = [rng.integers(len(texts[c])) for c in chosen]
                for name, (f, W) in Ws.items():
                    t = np.stack([f(c)[j] for c, j in zip(chosen, pick)])
                    w = np.c_[t, np.ones(len(t))] @ W
                    acc.setdefault(name, []).append(float(((q @ l2(w).T).argmax(-1) == y).mean()))
            for name, a in acc.items():
                res.setdefault((fam, name), []).append(float(np.mean(a)))
            print(fi, fam, {k: round(float(np.mean(v)), 4) for k, v in acc.items()}, flush=True)
    for (fam, name), v in sorted(res.items()):
        print(f"{fam} {name}: {np.mean(v):.4f} per fold {[round(x, 4) for x in v]}")
elif mode == "nested":
    # ridge lambda of the word map chosen inside each fold's training classes (inner class folds,
    # K = 0 score as the outer rule) instead of fixed; outer score on the held-out fold.
    from sgps_train import supervise
    from sgps_train.words import Words
    views = supervise.fold_views(HERE.parent, HERE.parent.parent.parent / "shared" / "data", here / "out", folds, False, 0)
    LAMS = eval(os.environ.get("LAMS", "(1.0, 3.0, 10.0, 30.0, 100.0)"))
    def zero_shot(E, feats, W, held, seed, n_ep=200):
        out = []
        for fam, n in (("derm", 4), ("skin", 5)):
            cls = family(held, fam)
            n = min(n, len(cls))
            if n < 2:
                out.append(float("nan")); continue
            rng = np.random.default_rng(seed)
            acc = []
            for _ in range(n_ep):
                chosen, q, y = queries(E, cls, n, rng)
                t = np.stack([feats[c][rng.integers(len(feats[c]))] for c in chosen])
                w = np.c_[t, np.ones(len(t))] @ W
                acc.append(float(((q @ l2(w).T).argmax(-1) == y).mean()))
            out.append(float(np.mean(acc)))
        return out
    fit = ridge_to_means
    res = {"fixed3": [], "nested": []}
    for fi, fold in enumerate(folds):
        E = views[fi][0]
        tr = [c for c in classes if c not in fold]
        words = Words.fit([s for c in tr for s in desc[c]])
        feats = {c: words.matrix(desc[c]) for c in classes}
        inner = C.make_folds(tr, 4, 1)
        inner_score = {}
        for lam in LAMS:
            sc = []
            for ij, ifold in enumerate(inner):
                itr = [c for c in tr if c not in ifold]
                iw = Words.fit([s for c in itr for s in desc[c]])
                ifeats = {c: iw.matrix(desc[c]) for c in tr}
                W = fit(E, ifeats, itr, lam)
                d, k = zero_shot(E, ifeats, W, ifold, 900 + ij)
                sc.append(np.nanmean([d, k]))
            inner_score[lam] = float(np.mean(sc))
        best = max(inner_score, key=inner_score.get)
        for name, lam in (("fixed3", 3.0), ("nested", best)):
            d, k = zero_shot(E, feats, fit(E, feats, tr, lam), fold, 500 + fi, 300)
            res[name].append((d, k))
        print(fi, "inner", {k: round(v, 4) for k, v in inner_score.items()}, "-> lam", best, {n: [round(x, 4) for x in r[-1]] for n, r in res.items()}, flush=True)
    for name, r in res.items():
        d = np.mean([x[0] for x in r]); k = np.mean([x[1] for x in r])
        print(f"{name}: derm_0 {d:.4f} skin_0 {k:.4f} mean {(d + k) / 2:.4f}")
