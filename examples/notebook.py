# %% [markdown]
# # kagglecmr in a notebook
#
# The flow of a Kaggle offline notebook with the Python API (`import kagglecmr as kc`): data -> folds ->
# train -> out-of-fold score -> load the ensemble -> probabilities of the test images -> submission.
# Cells are `# %%` (VS Code, Jupytext, Spyder). Here the data are the synthetic demo set and the model is
# tiny, so the whole notebook runs in a minute on a CPU; on Kaggle, point `DATA` at the competition
# folder and use `config="default"` with its full epochs.
#
# `KAGGLECMR_WORK` (default `work/`) is where everything is written; `KAGGLECMR_EPOCHS` the epochs.

# %%
import os
from pathlib import Path

import cv2
import numpy as np

import kagglecmr as kc

WORK = Path(os.environ.get("KAGGLECMR_WORK", "work"))
EPOCHS = int(os.environ.get("KAGGLECMR_EPOCHS", "2"))
DATA = WORK / "data"

# %% Data: a small synthetic dataset in the competition layout (train/, val/, test/)
kc.demo_data(DATA, n_train=16, n_val=4, n_test=6, seed=0, force=True)

# %% Folds: stratified, grouped, deterministic
folds = kc.make_folds(DATA, n_folds=2, seed=42, out=WORK / "folds.csv", force=True)
print(folds.folds.groupby("fold").size().to_dict())

# %% Train both folds (a tiny scratch Unet; quiet = one line per epoch)
tiny = ["model.params.encoder_depth=3", "model.params.decoder_channels=[16, 8, 4]"]
trained = kc.train("0..1", config="demo", data=DATA, folds=WORK / "folds.csv", runs_dir=WORK / "runs",
                   name="notebook", epochs=EPOCHS, overrides=tiny, device="cpu", quiet=True)
print(f"out-of-fold Dice {trained.score:.4f}", {f.fold: round(f.best_score, 4) for f in trained.folds})

# %% Honest estimate: the ensemble's out-of-fold predictions, with flip TTA, scored like the leaderboard
oof = kc.ensemble(trained.run_dir, data=DATA, split="oof", tta=True, postprocess="none", device="cpu",
                  out=WORK / "oof.csv")
print(f"OOF Dice {oof.score:.4f} per class {oof.per_class}; probabilities {oof.probs.shape}")
print(kc.score(WORK / "oof.csv", data=DATA).per_class)

# %% Offline inference: the ensemble as an object that takes numpy images of any size
model = kc.load_ensemble(trained.run_dir, tta=True, device="cpu")
paths = sorted((DATA / "test" / "image").glob("*.png"), key=lambda p: int(p.stem[3:]))
images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]
probs = model.predict_proba(images)  # float32 [N, K, H, W]
labels = probs.argmax(1).astype(np.uint8)
print(probs.shape, probs.dtype, "classes present:", np.unique(labels).tolist())

# %% Submission: one row per image and class, validated before it is written
from kagglecmr.formats.submission import label_to_rows  # noqa: E402
from kagglecmr.formats.submission_csv import write_submission  # noqa: E402

rows = [row for p, m in zip(paths, labels) for row in label_to_rows(p.stem, m, probs.shape[1])]
submission = write_submission(rows, WORK / "submission.csv", shape=labels.shape[1:], overwrite=True)
print(f"wrote {len(rows)} rows to {submission}")
