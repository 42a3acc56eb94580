"""``RUN/report.html``: one page people look at after a run, readable offline.

Sections: the promotion decision, the per-round metrics table (a round whose fine-tuning kept the teacher is
marked), metrics by round, ROC curves, tuning results and plots, and a heatmap gallery with a zoomable slide
viewer (OpenSeadragon, vendored, over Deep Zoom pyramids written here) overlaying per-patch scores.

Everything the page uses lies in ``RUN/report.html`` + ``RUN/report_files/``: nothing is loaded from the
network, so the pair can be copied, archived or opened on an air-gapped machine. The assets folder is staged
and renamed into place, then the page is written atomically; rerunning replaces both.

Example:
    >>> path = write_run_report("runs/demo")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'report.html'
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from icmil.io import write_text_atomic
from icmil.log import get_logger
from icmil.report.collect import RunContents, collect_run
from icmil.report.deepzoom import Pyramid, write_overlay, write_pyramid
from icmil.run_summary import SUMMARY_COLUMNS

log = get_logger("report")

REPORT_HTML = "report.html"
ASSETS = "report_files"
OSD_VERSION = "6.1.1"
VENDOR = Path(__file__).parent / "vendor" / "openseadragon"

# Column headers of the per-round table. WHICH columns it shows, and in what order, is icmil.run_summary's
# SUMMARY_COLUMNS (the table `icmil couple` / `icmil run` print), so the two tables cannot drift apart; a column
# without a header here shows under its own name. ``teacher_kept`` is the note column.
COLUMN_LABELS = {
    "round": "round",
    "val_auc": "val AUC",
    "test_auc": "test AUC",
    "test_accuracy": "test acc.",
    "test_f1": "test F1",
    "test_loss": "test loss",
    "patch_auc_test": "test patch AUC",
    "patch_auc_all": "patch AUC (all)",
    "finetune_best_step": "selected step",
    "finetune_teacher_val_auc": "teacher val AUC",
    "finetune_selected_val_auc": "selected val AUC",
    "finetune_teacher_cv_auc": "teacher CV AUC",
    "finetune_selected_cv_auc": "selected CV AUC",
}


def teacher_kept(row: Mapping[str, Any]) -> bool:
    """A coupling round whose fine-tuning kept the teacher: the row says so (``teacher_kept``), or the
    selected step is 0 — the teacher itself, which wins ties, so the round's encoder equals the previous one."""
    if "teacher_kept" in row and row["teacher_kept"] is not None:
        return bool(row["teacher_kept"])
    step = row.get("finetune_best_step")
    return int(row.get("round", 0)) >= 1 and isinstance(step, int | float) and not _nan(step) and step == 0


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _fmt(v: Any) -> str:
    if v is None or _nan(v):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1:
            return f"{v:.0f}"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class _Assets:
    """The staging folder of ``report_files`` and the URLs its files get in the page."""

    root: Path

    def copy(self, src: Path, rel: str) -> str:
        dst = self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return f"{ASSETS}/{rel}"

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class _ViewerSlide:
    slide_id: str
    title: str
    base: dict[str, Any] | None  # inline DZI tile source, or None when the slide is not readable here
    overlays: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


# --------------------------------------------------------------------------- sections


def _decision_section(reg: Mapping[str, Any]) -> str:
    if not reg:
        return (
            '<p class="muted">No registration in this run: <code>icmil couple</code> trains and evaluates; '
            "<code>icmil run</code> (the pipeline) registers the model and applies the promotion gate.</p>"
        )
    promoted = reg.get("promote", reg.get("promoted"))
    version = reg.get("version", "?")
    model = reg.get("model", "the model")
    if promoted is True:
        head = f'<div class="banner ok">Promoted: version {_e(version)} of {_e(model)} is the champion</div>'
    elif promoted is False:
        head = f'<div class="banner no">Not promoted: version {_e(version)} of {_e(model)} stays challenger</div>'
    else:
        head = f'<div class="banner">Registered: version {_e(version)} of {_e(model)}</div>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in reg.items())
    return f'{head}<table class="kv">{rows}</table>'


def _rounds_table(rows: Sequence[Mapping[str, Any]], rounds_planned: int | None = None) -> str:
    if not rows:
        return '<p class="muted">No finished round yet.</p>'
    cols = [
        (k, COLUMN_LABELS.get(k, k))
        for k in SUMMARY_COLUMNS
        if k != "teacher_kept" and any(k in r for r in rows)
    ]
    head = "".join(f"<th>{_e(label)}</th>" for _, label in cols) + "<th>note</th>"
    body = []
    for r in rows:
        kept = teacher_kept(r)
        reused = r.get("reused_from_round")
        note = (
            ("teacher kept" + (f": round {_fmt(reused)}'s model" if reused is not None else ""))
            if kept
            else ""
        )
        cells = "".join(f"<td>{_e(_fmt(r.get(k)))}</td>" for k, _ in cols)
        cls = ' class="kept"' if kept else ""
        body.append(f'<tr{cls} data-round="{_e(r.get("round"))}">{cells}<td>{_e(note)}</td></tr>')
    legend = (
        '<p class="muted">"teacher kept": fine-tuning found no student better than the teacher by the selection '
        "rule (coupling.selection; by default a head retrained in cross-validation over the train and val slides), "
        "so this round's encoder is the previous round's and nothing was re-embedded or retrained. All metrics: "
        "<code>summary.csv</code>.</p>"
    )
    last = int(rows[-1].get("round", 0))
    if rounds_planned is not None and last < rounds_planned and teacher_kept(rows[-1]):
        legend += (
            f'<p class="muted">Converged: round {last} kept its teacher, so rounds {last + 1}–{rounds_planned} '
            "were not run (<code>coupling.force_rounds=true</code> runs them).</p>"
        )
    return f'<table id="rounds" class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>{legend}'


def _metrics_plot(rows: Sequence[Mapping[str, Any]], assets: _Assets) -> str:
    series = [
        (k, label)
        for k, label in (
            ("val_auc", "val AUC"),
            ("test_auc", "test AUC"),
            ("patch_auc_test", "test patch AUC (instance teacher)"),
        )
        if any(isinstance(r.get(k), int | float) and not _nan(r.get(k)) for r in rows)
    ]
    if not rows or not series:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    rounds = [int(r["round"]) for r in rows]
    for k, label in series:
        ys = [float(r[k]) if isinstance(r.get(k), int | float) else np.nan for r in rows]
        ax.plot(rounds, ys, marker="o", label=label)
    ax.set(xlabel="round", ylabel="AUC", ylim=(0, 1.02), xticks=rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = assets.path("metrics_by_round.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return f'<img class="plot" src="{ASSETS}/metrics_by_round.png" alt="metrics by round">'


def _roc_section(contents: RunContents, assets: _Assets) -> str:
    figs = []
    rows = {int(r["round"]): r for r in contents.rounds}
    for k, head in sorted(contents.heads.items()):
        roc = head / "roc.png"
        if not roc.is_file():
            continue
        url = assets.copy(roc, f"roc/round_{k}.png")
        r = rows.get(k, {})
        caption = f"round {k}: test AUC {_fmt(r.get('test_auc'))}, val AUC {_fmt(r.get('val_auc'))}"
        figs.append(
            f'<figure><img src="{url}" alt="ROC round {k}"><figcaption>{_e(caption)}</figcaption></figure>'
        )
    return f'<div class="figs">{"".join(figs)}</div>' if figs else '<p class="muted">No ROC curves found.</p>'


def _tuning_section(contents: RunContents, assets: _Assets) -> str:
    if not contents.tuning:
        return '<p class="muted">No tuning in this run (<code>tuning.enabled: false</code>).</p>'
    parts = []
    for k, folder in sorted(contents.tuning.items()):
        try:
            best = json.loads((folder / "best_params.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            best = {}
        params = best.get("params", {}) if isinstance(best, dict) else {}
        counts = best.get("counts", {}) if isinstance(best, dict) else {}
        rows = "".join(f"<tr><th>{_e(p)}</th><td>{_e(_fmt(v))}</td></tr>" for p, v in params.items())
        summary = (
            f"{_e(best.get('target', 'mil'))} study {_e(best.get('study', ''))}: best "
            f"{_e(best.get('objective', 'objective'))} = {_e(_fmt(best.get('best_value')))} (trial "
            f"{_e(best.get('best_trial', '?'))}); trials: "
            + ", ".join(f"{_e(n)} {_e(c)}" for n, c in counts.items() if c)
        )
        plots = []
        for png in sorted(folder.glob("*.png")):
            url = assets.copy(png, f"tuning/round_{k}/{png.name}")
            plots.append(
                f'<figure><img src="{url}" alt="{_e(png.stem)}"><figcaption>{_e(png.stem)}</figcaption></figure>'
            )
        parts.append(
            f'<h3>Round {k}</h3><p>{summary}</p><table class="kv">{rows}</table>'
            f'<div class="figs">{"".join(plots)}</div>'
        )
    return "".join(parts)


# --------------------------------------------------------------------------- heatmaps and the viewer


def _manifest_paths(manifest: Path | None) -> dict[str, str]:
    """slide id -> slide path (relative paths resolved against the manifest's folder, as every stage does)."""
    if manifest is None:
        return {}
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    out = {}
    for sid, path in zip(df.get("slide_id", []), df.get("path", []), strict=False):
        p = str(path)
        if p and not p.startswith("s3://") and not Path(p).is_absolute():
            p = str((manifest.parent / p).resolve())
        out[str(sid)] = p
    return out


def _predictions(head: Path) -> dict[str, dict[str, Any]]:
    path = head / "predictions.csv"
    if not path.is_file():
        return {}
    import pandas as pd

    df = pd.read_csv(path)
    return {str(r["slide_id"]): dict(r) for r in df.to_dict("records")}


def _slide_scores(head_dir: Path, feature_dirs: Iterable[Path], slide_id: str) -> dict[str, Any] | None:
    """Per-patch scores of one slide from the round's bag head and features: raw attention (min-max scaled per
    slide, as in the training heatmaps) and the instance teacher's probability of not being class 0 (absolute)."""
    import torch

    from icmil.features import read_features
    from icmil.mil import load_mil_head
    from icmil.mil.data import patch_size_level0

    h5 = next((d / f"{slide_id}.h5" for d in feature_dirs if (d / f"{slide_id}.h5").is_file()), None)
    if h5 is None:
        return None
    bag = read_features(h5)
    head = load_mil_head(head_dir).eval()
    feats = torch.as_tensor(np.asarray(bag.features), dtype=torch.float32)
    with torch.no_grad():
        att = head.attention_scores(feats)
        p_pos = 1.0 - torch.softmax(head.instance_logits(feats), dim=1)[:, 0]
    out: dict[str, Any] = {
        "coords": np.asarray(bag.coords),
        "size": patch_size_level0(np.asarray(bag.coords), dict(bag.attrs)),
        "instance": p_pos.numpy(),
    }
    if att is not None:
        a = att.numpy().astype(float)
        span = a.max() - a.min() if len(a) else 0.0
        out["attention"] = (a - a.min()) / span if span > 0 else np.full_like(a, 0.5)
    return out


def _viewer_slide(
    slide_id: str,
    slide_path: str,
    scores: Mapping[str, Any],
    assets: _Assets,
    max_dim: int,
    title: str,
    classes: Sequence[str],
) -> _ViewerSlide:
    import openslide

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slide_id)
    level0: tuple[int, int] | None = None
    base = None
    note = ""
    if slide_path and not slide_path.startswith("s3://") and Path(slide_path).is_file():
        try:
            slide = openslide.OpenSlide(slide_path)
            try:
                pyramid: Pyramid = write_pyramid(
                    slide, assets.path(f"slides/{safe}"), safe, f"{ASSETS}/slides/{safe}", max_dim
                )
            finally:
                slide.close()
            base, level0 = pyramid.tile_source(), pyramid.level0
        except Exception as err:  # an unreadable slide still gets its scores shown
            note = f"slide image not shown ({type(err).__name__}: {err})"
    else:
        note = "slide image not available here (remote or moved); scores only"
    coords, size = scores["coords"], float(scores["size"])
    if level0 is None:
        xy = np.asarray(coords).reshape(-1, 2)
        level0 = (
            (int(xy[:, 0].max() + size), int(xy[:, 1].max() + size)) if len(xy) else (int(size), int(size))
        )
    negative = classes[0] if classes else "class 0"
    overlays = []
    for key, label in (
        ("instance", f"instance p(not {negative}), absolute 0–1"),
        ("attention", "attention (min–max per slide)"),
    ):
        if key not in scores:
            continue
        o = write_overlay(coords, scores[key], size, level0, assets.path(f"slides/{safe}/{key}.png"))
        overlays.append(
            {
                "key": key,
                "label": label,
                "url": f"{ASSETS}/slides/{safe}/{key}.png",
                "width": o.width_fraction,
            }
        )
    return _ViewerSlide(slide_id, title, base, overlays, note)


def _gallery_and_viewer(
    contents: RunContents, assets: _Assets, max_viewer_slides: int, max_dim: int
) -> tuple[str, list[_ViewerSlide]]:
    k = contents.final_round
    if k is None:
        return '<p class="muted">No trained head: no heatmaps.</p>', []
    head = contents.heads[k]
    preds = _predictions(head)
    pngs = sorted((head / "heatmaps").glob("*.png")) if (head / "heatmaps").is_dir() else []
    classes = _classes(preds)

    def order(sid: str) -> tuple[int, str]:
        p = preds.get(sid, {})
        return (int(p.get("label_index", 0) or 0) == 0, sid)  # positives first, as the training heatmaps

    ids = sorted((p.stem for p in pngs), key=order)
    if not ids:  # no drawn heatmaps: the test slides of the final round
        ids = sorted((s for s, p in preds.items() if p.get("split") == "test"), key=order)
    paths = _manifest_paths(contents.manifest)
    viewer: list[_ViewerSlide] = []
    for sid in ids[:max_viewer_slides]:
        try:
            scores = _slide_scores(head, contents.features.get(k, []), sid)
            if scores is None:
                continue
            viewer.append(
                _viewer_slide(sid, paths.get(sid, ""), scores, assets, max_dim, _caption(sid, preds), classes)
            )
        except Exception as err:  # one broken slide must not cost the whole report
            log.warning("report: no zoomable view of %s: %s", sid, err)
    figs = []
    zoomable = {v.slide_id for v in viewer}
    for png in sorted(pngs, key=lambda p: order(p.stem)):
        url = assets.copy(png, f"heatmaps/round_{k}/{png.name}")
        attr = (
            f' data-slide="{_e(png.stem)}" class="zoomable" title="open in the viewer"'
            if png.stem in zoomable
            else ""
        )
        figs.append(
            f'<figure{attr}><img src="{url}" alt="heatmap {_e(png.stem)}"><figcaption>{_e(_caption(png.stem, preds))}'
            "</figcaption></figure>"
        )
    gallery = (
        f"<p>Round {k} test slides, attention over the slide (min–max per slide). Click one to zoom.</p>"
        f'<div class="figs gallery">{"".join(figs)}</div>'
        if figs
        else '<p class="muted">No heatmap images in this run (<code>mil.max_heatmaps: 0</code>).</p>'
    )
    return gallery, viewer


def _classes(preds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    for p in preds.values():
        return [k.removeprefix("prob_") for k in p if str(k).startswith("prob_")]
    return []


def _caption(sid: str, preds: Mapping[str, Mapping[str, Any]]) -> str:
    p = preds.get(sid)
    if not p:
        return sid
    probs = ", ".join(
        f"p({k.removeprefix('prob_')}) {_fmt(v)}" for k, v in p.items() if str(k).startswith("prob_")
    )
    return f"{sid}: label {p.get('label', '?')}; {probs}"


def _viewer_section(slides: Sequence[_ViewerSlide]) -> str:
    if not slides:
        return (
            '<p class="muted">No slide could be shown in the zoomable viewer (no features or head found).</p>'
        )
    options = "".join(f'<option value="{_e(s.slide_id)}">{_e(s.title)}</option>' for s in slides)
    keys = []
    for s in slides:
        for o in s.overlays:
            if (o["key"], o["label"]) not in keys:
                keys.append((o["key"], o["label"]))
    layer = (
        "".join(f'<option value="{_e(k)}">{_e(label)}</option>' for k, label in keys)
        + '<option value="">none</option>'
    )
    data = {s.slide_id: {"base": s.base, "overlays": s.overlays, "note": s.note} for s in slides}
    return f"""
<div class="controls">
  <label>slide <select id="slide-select">{options}</select></label>
  <label>overlay <select id="layer-select">{layer}</select></label>
  <label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></label>
  <span class="colorbar"><span>0</span><span class="bar"></span><span>1</span></span>
</div>
<div id="slide-viewer"></div>
<p id="viewer-note" class="muted"></p>
<script id="slides-data" type="application/json">{_json_for_script(data)}</script>"""


def _json_for_script(obj: Any) -> str:
    # Inside <script>, "</" would end the element: escape it (and keep the JSON valid).
    return json.dumps(obj).replace("</", "<\\/")


# --------------------------------------------------------------------------- the page


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#fafbfc}
header{background:#1d2430;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8d0dc;font-size:12px}nav{padding:6px 24px;background:#eef1f5;font-size:13px}
nav a{margin-right:14px;color:#29527a}main{padding:8px 24px 40px;max-width:1400px}
h2{margin:28px 0 8px;font-size:17px;border-bottom:1px solid #dde3ea;padding-bottom:4px}h3{font-size:15px}
table.grid{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.grid th,table.grid td{border:1px solid #d5dbe3;padding:4px 9px;text-align:right}
table.grid th{background:#eef1f5}tr.kept td{background:#fff6db}tr.kept td:last-child{font-weight:600}
table.kv{border-collapse:collapse;margin:6px 0}table.kv th{text-align:left;padding:2px 12px 2px 0;color:#4a5566}
table.kv td{padding:2px 0}.muted{color:#6b7789}.banner{padding:10px 14px;border-radius:6px;font-weight:600;
background:#e8eef6;margin:8px 0}.banner.ok{background:#dcf3e3;color:#17603a}.banner.no{background:#fde4e1;color:#8a2318}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;background:#fff;border:1px solid #dde3ea;padding:6px}
figure img{max-width:420px;display:block}figcaption{font-size:12px;color:#4a5566;max-width:420px}
.gallery figure img{max-width:300px}.gallery figure.zoomable{cursor:zoom-in}.gallery figure.zoomable:hover{border-color:#29527a}
img.plot{max-width:620px}#slide-viewer{width:100%;height:520px;background:#fff;border:1px solid #c9d1db}
.controls{display:flex;gap:18px;align-items:center;margin:6px 0;flex-wrap:wrap}
.colorbar{display:inline-flex;align-items:center;gap:6px;font-size:12px}
.colorbar .bar{display:inline-block;width:160px;height:12px;border:1px solid #999;
background:linear-gradient(90deg,#30123b,#4686fb,#1ae4b6,#a2fc3c,#fabb39,#e4460a,#7a0403)}
"""

# Errors are recorded in the page itself (and logged to the console), so a headless browser check can read
# them from the DOM as well as from the console output.
_ERROR_CAPTURE = """
(function(){var errs=[];function rec(m){errs.push(String(m));document.documentElement.setAttribute('data-errors',JSON.stringify(errs));}
window.addEventListener('error',function(e){rec(e.message||('failed to load '+((e.target&&(e.target.src||e.target.href))||'resource')));},true);
window.addEventListener('unhandledrejection',function(e){rec('unhandled rejection: '+e.reason);});
var ce=console.error;console.error=function(){rec(Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};})();
"""

_VIEWER_JS = """
(function(){
var el=document.getElementById('slides-data');if(!el){document.documentElement.setAttribute('data-viewer','none');return;}
var slides=JSON.parse(el.textContent);var slideSel=document.getElementById('slide-select');
var layerSel=document.getElementById('layer-select');var opacity=document.getElementById('opacity');
var note=document.getElementById('viewer-note');var loaded=0;
var viewer=OpenSeadragon({id:'slide-viewer',prefixUrl:'report_files/openseadragon/images/',drawer:'canvas',
  showNavigator:true,navigatorPosition:'BOTTOM_RIGHT',maxZoomPixelRatio:4,visibilityRatio:0.5,
  crossOriginPolicy:false,immediateRender:true,gestureSettingsMouse:{clickToZoom:false}});
viewer.addHandler('tile-loaded',function(){loaded++;document.documentElement.setAttribute('data-tiles-loaded',loaded);});
viewer.addHandler('open-failed',function(e){console.error('viewer: could not open '+e.message);});
function style(){var key=layerSel.value,op=parseFloat(opacity.value);var s=slides[slideSel.value];
  for(var i=0;i<viewer.world.getItemCount();i++){var item=viewer.world.getItemAt(i);var k=item.__icmilKey;
    if(k===undefined){continue;}item.setOpacity(k===key?op:0);}}
function show(id){var s=slides[id];if(!s){return;}var sources=[];
  if(s.base){sources.push({tileSource:s.base,x:0,y:0,width:1,success:function(e){e.item.__icmilKey=undefined;}});}
  s.overlays.forEach(function(o){sources.push({tileSource:{type:'image',url:o.url,buildPyramid:false},x:0,y:0,
    width:o.width,opacity:0,success:function(e){e.item.__icmilKey=o.key;style();}});});
  note.textContent=s.note||'';viewer.open(sources);
  viewer.addOnceHandler('open',function(){document.documentElement.setAttribute('data-viewer','open');style();});}
// A view can be linked: report.html#slide=<id>&layer=<instance|attention|>&opacity=<0..1>
var hash=new URLSearchParams(location.hash.slice(1));
if(hash.has('slide')&&slides[hash.get('slide')]){slideSel.value=hash.get('slide');}
if(hash.has('layer')){layerSel.value=hash.get('layer');}
if(hash.has('opacity')){opacity.value=hash.get('opacity');}
function rects(){var out={};['rounds','slide-viewer'].forEach(function(id){var e=document.getElementById(id);
  if(e){var r=e.getBoundingClientRect();out[id]=[r.left+scrollX,r.top+scrollY,r.width,r.height];}});
  document.documentElement.setAttribute('data-rects',JSON.stringify(out));}
rects();window.addEventListener('resize',rects);
slideSel.addEventListener('change',function(){show(slideSel.value);});
layerSel.addEventListener('change',style);opacity.addEventListener('input',style);
document.querySelectorAll('figure.zoomable').forEach(function(f){f.addEventListener('click',function(){
  slideSel.value=f.getAttribute('data-slide');show(slideSel.value);
  document.getElementById('slide-viewer').scrollIntoView({behavior:'smooth'});});});
show(slideSel.value);
})();
"""


def _page(contents: RunContents, sections: Sequence[tuple[str, str, str]], has_viewer: bool) -> str:
    run = contents.run_dir
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    final = contents.rounds[-1] if contents.rounds else {}
    subtitle = (
        f"{_e(run.resolve())} · {len(contents.rounds)} round(s) · final test AUC {_e(_fmt(final.get('test_auc')))}"
        f" · written {made}"
    )
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    scripts = (
        f'<script src="{ASSETS}/openseadragon/openseadragon.min.js"></script><script>{_VIEWER_JS}</script>'
        if has_viewer
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ICMIL run report · {_e(run.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script>{_ERROR_CAPTURE}</script><style>{_CSS}</style></head>
<body><header><h1>ICMIL run report — {_e(run.name)}</h1><p>{subtitle}</p></header><nav>{nav}</nav>
<main>{body}<p class="muted">Viewer: OpenSeadragon {OSD_VERSION} (BSD-3-Clause, {ASSETS}/openseadragon/LICENSE.txt).
Everything on this page is in this folder; nothing is loaded from the network.</p></main>{scripts}</body></html>
"""


def _unavailable(what: str) -> str:
    return f'<p class="muted">{_e(what)}: nothing to show (see the log).</p>'


def _safe(what: str, build: Callable[[], str]) -> str:
    """One section's HTML; a section that fails is reported in the page and the log, never the whole report
    (the run it describes has finished: a broken picture must not turn it into a failure)."""
    try:
        return build()
    except Exception as err:
        log.warning("report: %s left out: %s: %s", what, type(err).__name__, err)
        return f'<p class="muted">{_e(what)} not available: {_e(type(err).__name__)}: {_e(err)}</p>'


def write_run_report(
    run_dir: str | os.PathLike[str], *, max_viewer_slides: int = 4, pyramid_max_dim: int = 4096
) -> Path:
    """Write ``run_dir/report.html`` (+ ``report_files/``) from what the run folder holds; returns the path.

    ``max_viewer_slides`` slides (the heatmap gallery's, positives first) get a zoomable Deep Zoom pyramid up
    to ``pyramid_max_dim`` px and per-patch score overlays recomputed from the final round's head and features.
    """
    contents = collect_run(run_dir)
    run = contents.run_dir
    for leftover in [*run.glob(f".{ASSETS}.tmp-*"), *run.glob(f".{ASSETS}.old-*")]:  # from a killed writer
        shutil.rmtree(leftover, ignore_errors=True)
    staging = run / f".{ASSETS}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        assets = _Assets(staging)
        try:
            gallery, viewer_slides = _gallery_and_viewer(contents, assets, max_viewer_slides, pyramid_max_dim)
        except Exception as err:
            log.warning("report: heatmaps left out: %s: %s", type(err).__name__, err)
            gallery, viewer_slides = "", []
        # Table and viewer first: the two things people open the report for fit on one screen.
        sections = [
            (
                "decision",
                "Promotion decision",
                _safe("decision", lambda: _decision_section(contents.registration)),
            ),
            (
                "rounds",
                "Metrics by round",
                _safe("table", lambda: _rounds_table(contents.rounds, contents.rounds_planned)),
            ),
            ("viewer", "Zoomable slide and heatmap", _viewer_section(viewer_slides)),
            ("gallery", "Heatmap gallery", gallery or _unavailable("heatmaps")),
            (
                "curves",
                "Metrics by round (plot)",
                _safe("plot", lambda: _metrics_plot(contents.rounds, assets) or _unavailable("plot")),
            ),
            ("roc", "ROC curves", _safe("ROC curves", lambda: _roc_section(contents, assets))),
            ("tuning", "Tuning", _safe("tuning", lambda: _tuning_section(contents, assets))),
        ]
        if viewer_slides:
            shutil.copytree(VENDOR, staging / "openseadragon")
        page = _page(contents, sections, has_viewer=bool(viewer_slides))
        _swap_into_place(staging, run / ASSETS)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out = write_text_atomic(run / REPORT_HTML, page)
    log.debug("report: %s", out)
    return out


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames (the old folder is removed afterwards)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
