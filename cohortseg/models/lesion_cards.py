"""Which card is which network in the lesion pipelines (``cmb``, ``wmh``) and in ``brain_tissue``'s
head-net path: the deep-T1-WMH nets a card names (``architecture.params.net``), the brain-mask cards,
the SHIVA segmentation cards and their modalities. Reads cards only; runs nothing."""
from __future__ import annotations

from cohortseg.errors import ModelError

#: the deep-T1-WMH networks (Thyreau et al. 2022) a card can provide
NETS = ("head", "affine", "rois", "wmh")
#: SHIVA modality name -> contrast name used in model cards (BIDS suffix where one exists)
MODALITY_CONTRAST = {"t1": "T1w", "flair": "FLAIR", "swi": "SWI", "t2gre": "T2starw", "t2": "T2w"}


def card_net(card) -> str | None:
    """The deep-T1-WMH network a card provides (``architecture.params.net``), or None."""
    arch = card["architecture"]
    net = (arch.get("params") or {}).get("net")
    if arch.get("loader") == "deepwmh_torch" or net in NETS:
        if net not in NETS:
            raise ModelError(f"model '{card.name}': architecture.params.net must be one of {', '.join(NETS)}")
        return net
    return None


def uses_deepwmh(cards) -> bool:
    """True when the WMH segmentation itself is deep-T1-WMH's (a card provides its ``wmh`` net); the head
    net alone is only a brain-mask model (e.g. before a SHIVA card)."""
    return any(card_net(c) == "wmh" for c in cards)


def net_cards(cards, need=NETS) -> dict[str, int]:
    """net -> index in `cards`; ModelError when one of `need` is missing or given twice, or when a card
    of another method is mixed in."""
    out: dict[str, int] = {}
    for i, c in enumerate(cards):
        net = card_net(c)
        if net is None:
            raise ModelError(f"model '{c.name}' is not a deep-T1-WMH network: the deep-T1-WMH cards "
                             f"({', '.join(NETS)}) cannot be mixed with other WMH models in one pipeline")
        if net in out:
            raise ModelError(f"two cards provide the deep-T1-WMH {net} net: {cards[out[net]].name}, {c.name}")
        out[net] = i
    missing = [n for n in need if n not in out]
    if missing:
        raise ModelError(f"deep-T1-WMH needs a card for each of its networks; missing: {', '.join(missing)} "
                         "(default cards: deepwmh_head, deepwmh_affine, deepwmh_rois, deepwmh_wmh)")
    return out


def is_head_card(card) -> bool:
    """The deep-T1-WMH head net: an intracranial mask from the session's T1 (seconds on a CPU)."""
    return card_net(card) == "head"


def is_affine_card(card) -> bool:
    """The deep-T1-WMH affine net: with the head net, the T1 -> MNI affine in seconds (instead of antspyx)."""
    return card_net(card) == "affine"


def is_mask_card(card) -> bool:
    """A brain-mask model: a brainchop MeshNet (loader tfjs_layers), a card saying ``task: brain_mask``,
    or the deep-T1-WMH head net (:func:`is_head_card`)."""
    return (card.get("task") == "brain_mask" or card["architecture"].get("loader") == "tfjs_layers"
            or is_head_card(card))


def deep_mni(cards) -> bool:
    """Whether sessions with a T1 take their MNI affine from the deep-T1-WMH nets (head first + affine)."""
    return bool(cards) and is_head_card(cards[0]) and any(is_affine_card(c) for c in cards)


def card_modalities(card) -> list[str]:
    """SHIVA modalities of a card (``modalities`` key, else derived from ``contrasts``)."""
    mods = card.get("modalities")
    if mods:
        return [str(m).lower() for m in mods]
    back = {v.lower(): k for k, v in MODALITY_CONTRAST.items()}
    return [back.get(str(c).lower(), str(c).lower()) for c in card["contrasts"]]


def split_cards(cards: list) -> tuple[int | None, list[int]]:
    """(index of the brain-mask card or None, indices of the segmentation cards)."""
    mask_i = None
    seg = []
    for i, c in enumerate(cards):
        if is_affine_card(c):
            if not (cards and is_head_card(cards[0])):
                raise ModelError(f"model '{c.name}' (deep-T1-WMH affine net) needs the deep-T1-WMH head net "
                                 "(deepwmh_head) first in the pipeline's `models` list")
            continue
        if is_mask_card(c):
            if i != 0:
                raise ModelError(f"model '{c.name}' is a brain-mask model: it must be the first card of the "
                                 "pipeline's `models` list")
            mask_i = i
        else:
            seg.append(i)
    if not seg:
        raise ModelError("no lesion segmentation model (SHIVA card) in the pipeline's `models` list")
    return mask_i, seg


def card_channels(cards, modality_roles: dict, pipeline: str, only=None) -> list[str]:
    """The SHIVA modalities of the segmentation cards (or of the cards `only` indexes), in order of
    appearance; ModelError for a modality the pipeline has no input role for."""
    _, seg = split_cards(cards)
    chans: list[str] = []
    for i in (seg if only is None else only):
        for m in card_modalities(cards[i]):
            if m not in modality_roles:
                raise ModelError(f"model '{cards[i].name}' needs modality '{m}', which the {pipeline} pipeline "
                                 f"does not provide (it knows {sorted(modality_roles)})")
            if m not in chans:
                chans.append(m)
    return chans


def choose_cards(cards, available: set, modality_roles: dict, pipeline: str) -> tuple[list[int], list[str]]:
    """The segmentation cards a session can run: those whose modalities it has, and of those the
    ones using the most modalities (a T1+FLAIR card where the FLAIR exists, a T1-only card listed
    beside it where it does not). Returns (card indices, warnings)."""
    _, seg = split_cards(cards)
    card_channels(cards, modality_roles, pipeline)  # every modality must be one the pipeline provides
    usable = [i for i in seg if set(card_modalities(cards[i])) <= available]
    if not usable:
        return [], []
    best = max(len(card_modalities(cards[i])) for i in usable)
    chosen = [i for i in usable if len(card_modalities(cards[i])) == best]
    skipped = [cards[i].name for i in seg if i not in chosen]
    warn = [f"models used: {', '.join(cards[i].name for i in chosen)}; not used: {', '.join(skipped)} "
            f"(session has {', '.join(sorted(available))})"] if skipped else []
    return chosen, warn
