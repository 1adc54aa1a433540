"""One colour per emotion label, the same on the web page and in the confusion plots: the Okabe-Ito palette
(distinguishable with the common colour-vision deficiencies), fixed for the labels of MELD and IEMOCAP, in
order for any other label set. Every place that shows a colour also shows the label's name."""

from __future__ import annotations

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
KNOWN = {"neutral": "#999999", "joy": "#E69F00", "happy": "#E69F00", "excited": "#F0E442", "surprise": "#56B4E9",
         "sadness": "#0072B2", "sad": "#0072B2", "anger": "#D55E00", "angry": "#D55E00", "disgust": "#009E73",
         "fear": "#CC79A7", "frustrated": "#CC79A7"}
EXTRA = ("#882255", "#44AA99", "#332288", "#117733", "#AA4499", "#661100", "#6699CC", "#888888")  # Paul Tol's


def colours(labels) -> dict[str, str]:
    """Label -> hex colour; known emotion names keep theirs, the others take unused colours in order."""
    out = {lab: KNOWN[lab.lower()] for lab in labels if lab.lower() in KNOWN}
    if len(set(out.values())) < len(out):  # two known labels share a colour in this set: order instead
        out = {}
    free = [c for c in OKABE_ITO + EXTRA if c not in out.values()]
    for lab in labels:
        if lab not in out:
            out[lab] = free.pop(0) if free else "#000000"
    return out
