"""The score of a detector that knows nothing of where actions are: the floor the miniature's rows are
measured against (bash train.sh prints it beside them).

For each validation video, 100 segments with a uniform centre in [0, duration] and a uniform length in
(0, duration], clipped, with uniform scores, each given the video's top-2 classes from the same
video-level scores the stage-3 rows use (as gtad.assign_classes does), so it differs from them only in
localization. Mean ± std over --draws seeds.

    python tests/bench/random_detector.py --anno data/synth/anno.json --scores runs/baseline/video_scores.json
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
import evaluate  # noqa: E402
import gtad  # noqa: E402


def random_detections(anno, scores, seed, per_video=100):
    videos, (class_scores, names) = data.read_annotations(anno, "validation")[0], gtad.read_video_scores(scores)
    rng, results = np.random.default_rng(seed), {}
    for vid in sorted(set(videos) & set(class_scores)):
        duration = videos[vid].duration
        centre, length = rng.uniform(0, duration, per_video), rng.uniform(0, duration, per_video)
        segments = np.clip(np.stack([centre - length / 2, centre + length / 2], 1), 0, duration)   # (P, 2)
        results[vid] = gtad.assign_classes(segments, rng.uniform(0, 1, per_video), class_scores[vid], names)
    return dict(results=results)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anno", required=True)
    p.add_argument("--scores", required=True, help="video-level scores (CUHK format), e.g. <stage-3 run>/video_scores.json")
    p.add_argument("--draws", type=int, default=5)
    args = p.parse_args()
    m = [100 * evaluate.detection_map(args.anno, random_detections(args.anno, args.scores, s))[1]
         for s in range(args.draws)]
    auc = [evaluate.proposal_recall(args.anno, random_detections(args.anno, args.scores, s))["AUC"]
           for s in range(args.draws)]
    print(f"random detector: average mAP {np.mean(m):.2f} ± {np.std(m):.2f}, proposal AUC {np.mean(auc):.2f} ± "
          f"{np.std(auc):.2f} ({args.draws} draws)")


if __name__ == "__main__":
    main()
