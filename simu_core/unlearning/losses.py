"""Unlearning losses: each published formula, on answer tokens, as open-unlearning computes it.

Every term is MINIMISED; :class:`simu_core.unlearning.objective.UnlearningObjective` weighs a forget
term and a retain term. Conventions: ``logits`` [B, T, V] in any float dtype, scored in float32;
``labels`` [B, T] with IGNORE_INDEX on the prompt and on padding; position t's logits predict
``labels[t + 1]`` (:func:`simu_core.scoring.token_logprobs`); a reference model's inputs are detached.
``OPEN_UNLEARNING_DEFAULTS`` holds open-unlearning's hyper-parameters, each with the file it comes from.

**Gradient ascent, GradDiff, NPO, SimNPO, KL.**

Every objective is ``gamma_f * forget_term + alpha_r * retain_term`` and is MINIMISED:

- ``ga`` forget term: ``-CE(forget)`` (gradient ascent on the forget answers).
- ``npo`` forget term (Zhang et al. 2024): ``-(2/beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))``
  with sequence log-probabilities summed over answer tokens and ``p_ref`` a frozen reference
  (the model before unlearning).
- ``simnpo`` forget term (Fan et al. 2024): ``-(2/beta) * mean log sigmoid(-(beta/|y|) log p(y|x) - gamma)``:
  length-normalised and reference-free. Its beta is its own (``simnpo_beta``, default 4.5 as in
  open-unlearning), not NPO's: at NPO's 0.1 the weight ``sigmoid`` puts on a sequence stays in
  [0.76, 1.0] and SimNPO is length-normalised gradient ascent.
- retain term ``nll``: ``CE(retain)`` (GradDiff); ``kl``: ``KL(p_ref || p)`` per answer position,
  averaged over positions, against the frozen reference.

"Answer tokens" are the labelled positions of :mod:`simu_core.prompting` examples (labels are
IGNORE_INDEX on the prompt), shifted by one as in :func:`simu_core.scoring.token_logprobs`.

**UNDIAL, WGA, SatImp, CE-U, PDU.**

These follow open-unlearning (``locuslab/open-unlearning``) formula for formula; each docstring gives the
formula, the paper, open-unlearning's defaults with the file they come from, and where this module
deliberately differs. Conventions are those of :mod:`simu_core.unlearning.losses`:

- ``logits`` are [B, T, V] in any float dtype and are scored in float32; ``labels`` are [B, T] with
  IGNORE_INDEX on the prompt and on padding.
- Position t's logits predict ``labels[t + 1]`` (the shift of :func:`simu_core.scoring.token_logprobs`);
  "answer positions" are the positions t whose next label is not IGNORE_INDEX. Averages are over all
  answer positions of the batch (token-weighted), as open-unlearning's ``[mask].mean()``.
- Every function returns a scalar that is MINIMISED; a forget term lowers the model's knowledge of the
  forget answers when minimised. Reference (teacher) logits are detached and get no gradient.
- A batch without answer positions gives ``0`` with a zero gradient (open-unlearning's ``mean`` of an
  empty selection is NaN there); this is the only difference in WGA, SatImp and CE-U.

open-unlearning commits read (``read_file``): ``src/trainer/utils.py`` 19a6141d / be846131 (same
UNDIAL, WGA, SatImp helpers), ``src/trainer/unlearn/undial.py`` 8b62e390, ``wga.py`` afcd6b6b,
``satimp.py`` 423c6f2c, ``ceu.py`` afcd6b6b, ``pdu.py`` fdeb28f8 (masked, after PR #147) and 17e8e731
(earlier, all positions), ``grad_diff.py`` 7fa0b552; configs ``UNDIAL.yaml`` 5a7dfb45, ``WGA.yaml``
2757110f, ``SatImp.yaml`` 423c6f2c. ``CEU.yaml`` and ``PDU.yaml`` are not in the index searched: their
defaults below are the Python ones.

**DPO / IdkDPO, AltPO, RMU.**

These follow open-unlearning (``locuslab/open-unlearning``) formula for formula; each docstring gives the
formula, the paper, open-unlearning's defaults with the file they come from, and where this module
deliberately differs. Conventions are those of :mod:`simu_core.unlearning.losses`:

- ``logits`` are [B, T, V] in any float dtype and are scored in float32; ``labels`` are [B, T] with
  IGNORE_INDEX on the prompt and on padding. Position t's logits predict ``labels[t + 1]`` (the shift of
  :func:`simu_core.scoring.token_logprobs`); a sequence's log-probability is the SUM over its answer tokens.
- Every function returns a scalar that is MINIMISED. Reference-model inputs are detached and get no gradient.
- The preference losses take PAIRS: row i of the win ("preferred") batch and row i of the lose
  ("rejected") batch are two answers to the same question. For unlearning the lose side is the forget
  answer and the win side its replacement: an "I don't know" answer (IdkDPO) or a model-written
  alternate answer (AltPO).

open-unlearning files read (``read_file``; commit ids are those of the stored versions):
``src/trainer/unlearn/dpo.py`` afcd6b6b, ``src/trainer/utils.py`` 19a6141d / be846131 (same
``compute_dpo_loss`` and ``compute_batch_nll``), ``src/trainer/unlearn/rmu.py`` afcd6b6b / 7fa0b552 (same
loss code), ``src/trainer/unlearn/grad_diff.py`` f7656c77, ``configs/trainer/RMU.yaml`` 8f9872c2,
``src/data/qa.py`` 817e5c92 (``QAwithIdkDataset``, ``QAwithAlternateDataset``), ``docs/results.md`` 8f9872c2,
``community/methods/AltPO/{README.md 9a788f6a, generate.py 5420d43e, prompts.py 5420d43e}``.
``configs/trainer/DPO.yaml``, ``GradDiff.yaml`` and the AltPO ``run.sh`` / ``generate.yaml`` of
locuslab/open-unlearning are not in the index searched: their values below are read in forks (named, with
commit, where used; not verified against upstream) and cross-checked against the Python defaults and
``docs/results.md``; GradDiff's values are its Python defaults.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from simu_core.prompting import IGNORE_INDEX
from simu_core.scoring import answer_loss, token_logprobs

__all__ = [
    "OPEN_UNLEARNING_DEFAULTS",
    "WMDP_RMU_ZEPHYR",
    "activation_mse",
    "altpo_loss",
    "answer_nll",
    "ceu_loss",
    "dpo_loss",
    "gradient_ascent_loss",
    "kl_to_reference",
    "npo_loss",
    "pdu_dual_update",
    "pdu_forget_loss",
    "preference_margin",
    "rmu_answer_mask",
    "rmu_control_vector",
    "satimp_loss",
    "sequence_logprobs",
    "simnpo_loss",
    "undial_loss",
    "wga_loss",
]


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the batch (token-weighted)."""
    return answer_loss(logits, labels)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed answer-token log-probability [B] and the answer length [B]."""
    logprobs, mask = token_logprobs(logits, labels)
    return logprobs.sum(-1), mask.sum(-1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-CE`` on the forget answers: minimising it raises their loss."""
    return -answer_nll(logits, labels)


def npo_loss(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative preference optimisation against a frozen reference (sequence-level log-ratio)."""
    logp, _ = sequence_logprobs(logits, labels)
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(reference_logits.detach(), labels)
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def simnpo_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO: NPO without a reference, on the length-normalised log-probability, with margin gamma."""
    logp, length = sequence_logprobs(logits, labels)
    # clamp: a sequence whose answer was cut away entirely contributes log sigmoid(-gamma), not NaN.
    mean_logp = logp / length.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma).mean()


def kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p)`` at each answer position (the positions that predict answer tokens), averaged."""
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference_logits[:, :-1].detach().float(), dim=-1)
    # Masked, not indexed (fake tensors in `simu plan` cannot index by a mask); 0 for an answer-less batch.
    return _masked_mean(F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(-1), mask)

#: open-unlearning's default hyper-parameters. ``gamma`` weighs the forget term and ``alpha`` the
#: retain term (``gamma * forget + alpha * retain``): ``UnlearningObjective``'s ``forget_weight`` and
#: ``retain_weight``.
_TOKEN_DEFAULTS: dict[str, dict[str, Any]] = {
    # configs/trainer/UNDIAL.yaml (method_args; the class default in src/trainer/unlearn/undial.py is beta=1.0).
    "undial": {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss_type": "NLL"},
    # configs/trainer/WGA.yaml (method_args; same as the class defaults in src/trainer/unlearn/wga.py).
    "wga": {"beta": 1.0, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
    # configs/trainer/SatImp.yaml (method_args). The class in src/trainer/unlearn/satimp.py has the weights
    # the other way round (gamma=1.0, alpha=0.1); beta1/beta2 agree everywhere (and with the paper).
    "satimp": {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0, "retain_loss_type": "NLL"},
    # src/trainer/unlearn/ceu.py (CEU.__init__; no configs/trainer/CEU.yaml in the index). Forget term only.
    "ceu": {"ignore_first_n_answer_tokens": 1},
    # src/trainer/unlearn/pdu.py (PDU.__init__) and grad_diff.py (GradDiff: gamma, alpha, retain_loss_type);
    # no configs/trainer/PDU.yaml in the index.
    "pdu": {
        "retain_loss_eps": 0.0,
        "primal_dual": False,
        "dual_step_size": 1.0,
        "dual_update_upon": "step",
        "dual_warmup_epochs": 0,
        "gamma": 1.0,
        "alpha": 1.0,
        "retain_loss_type": "NLL",
    },
}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 (a zero gradient) without any. No boolean indexing, so that
    fake tensors (``simu plan``) and every batch take the same path."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shifted float32 logits [B, T-1, V], the shifted labels [B, T-1] and the answer mask [B, T-1]."""
    shifted_labels = labels[:, 1:]
    return logits[:, :-1].float(), shifted_labels, shifted_labels != IGNORE_INDEX


def undial_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference_logits: torch.Tensor,
    beta: float,
    all_positions: bool = False,
) -> torch.Tensor:
    """UNDIAL: self-distillation toward the reference with the true next token's logit lowered by ``beta``.

    Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
    Language Models" (arXiv:2402.10052). At each answer position t with next token y = labels[t+1]:

        q_t = softmax(z_ref_t - beta * onehot(y)),    loss_t = CE(q_t, p_t) = -sum_v q_t[v] log p_t[v]

    with ``z_ref`` the frozen reference's logits (detached) and ``p_t = softmax(z_t)`` the model's;
    the loss is the mean of ``loss_t`` over answer positions. Minimising it moves ``p`` to the
    teacher's distribution with y made ``exp(beta)`` times less likely (``beta = 0``: distillation to
    the reference, minimal when the model equals it). open-unlearning: ``compute_undial_loss`` in
    ``src/trainer/utils.py``, class ``UNDIAL`` in ``src/trainer/unlearn/undial.py``.

    Defaults: beta 10, gamma 1, alpha 0 (no retain term), retain NLL, ``configs/trainer/UNDIAL.yaml``
    (the class default is beta 1.0).

    Deliberate difference: open-unlearning averages over ALL B*(T-1) shifted positions (prompt and
    padding included), not only answer positions, and builds the adjustment by indexing the vocabulary
    with the label there, so at an unlabelled position (label -100) it lowers the teacher logit of
    vocabulary id V-100 (negative indexing; it errors for V < 100). Here the default averages over
    answer positions only (the paper's forget tokens, this module's convention). ``all_positions=True``
    averages over every shifted position as open-unlearning does, with the plain (unadjusted) teacher
    as target at unlabelled positions: open-unlearning's value up to its V-100 artefact (negligible
    where the teacher gives that id ~0 probability). There the prompt and padding positions act as
    distillation to the reference and the answer positions weigh in proportion to their share.
    """
    shifted_logits, shifted_labels, mask = _answer_positions(logits, labels)
    teacher = reference_logits[:, :-1].detach().float()
    adjust = (-float(beta) * mask.to(teacher.dtype)).unsqueeze(-1)  # lowered at answer positions only
    with torch.no_grad():
        safe_labels = shifted_labels.masked_fill(shifted_labels == IGNORE_INDEX, 0).unsqueeze(-1)
        target = torch.softmax(teacher.scatter_add(-1, safe_labels, adjust), dim=-1)
    per_position = -(target * torch.log_softmax(shifted_logits, dim=-1)).sum(-1)
    if all_positions:
        return per_position.mean()
    return _masked_mean(per_position, mask)


def _weighted_ascent(logits: torch.Tensor, labels: torch.Tensor, exponents: tuple[float, float]) -> torch.Tensor:
    """``-mean_t w_t * CE_t`` over answer positions with ``w_t = p_t^a (1 - p_t)^b`` detached."""
    logprobs, mask = token_logprobs(logits, labels)
    prob = logprobs.detach().exp()
    weight = prob ** exponents[0] * (1.0 - prob) ** exponents[1]
    return _masked_mean(weight * logprobs, mask)  # = -(weight * CE).mean(), CE = -log p


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Weighted gradient ascent (WGA): gradient ascent with each token weighted by ``p^beta``.

    Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond"
    (ICLR 2025, arXiv:2502.19301). With ``CE_t = -log p_t(y_t)`` at answer position t and the weight
    ``w_t = p_t(y_t)^beta = exp(-beta * CE_t)`` treated as a constant (detached):

        loss = -mean_t w_t * CE_t       (mean over all answer positions of the batch)

    ``beta = 0`` is plain gradient ascent (``-CE``); larger beta stops pushing on tokens that are
    already unlikely. open-unlearning: ``compute_wga_loss`` in ``src/trainer/utils.py``, class ``WGA``
    in ``src/trainer/unlearn/wga.py``.

    Defaults: beta 1.0, gamma 1.0, alpha 1.0, retain NLL, ``configs/trainer/WGA.yaml``.

    Same formula as open-unlearning (scored in float32; an answer-less batch gives 0, not NaN).
    """
    return _weighted_ascent(logits, labels, (float(beta), 0.0))


def satimp_loss(logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp: gradient ascent weighted by saturation ``p^beta1`` times importance ``(1 - p)^beta2``.

    Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning" (ICML 2025,
    arXiv:2505.11953). With ``p_t = p_t(y_t)`` at answer position t and the weight
    ``w_t = p_t^beta1 * (1 - p_t)^beta2`` treated as a constant (detached):

        loss = -mean_t w_t * CE_t,    CE_t = -log p_t     (mean over all answer positions)

    ``beta2 = 0`` is WGA with beta = beta1. open-unlearning: ``compute_satimp_loss`` in
    ``src/trainer/utils.py`` (and the same code inline in ``src/trainer/unlearn/satimp.py``).

    Defaults: beta1 5.0, beta2 1.0, ``configs/trainer/SatImp.yaml`` (also the class defaults). That
    yaml sets gamma 0.1, alpha 1.0; the class ``SatImp`` defaults to gamma 1.0, alpha 0.1.

    Same formula as open-unlearning (scored in float32; an answer-less batch gives 0, not NaN).
    """
    return _weighted_ascent(logits, labels, (float(beta1), float(beta2)))


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_first_n_answer_tokens: int = 1) -> torch.Tensor:
    """CE-U: cross-entropy toward the model's own distribution with the true token removed.

    Yang et al. 2025, "CE-U: Cross Entropy Unlearning" (arXiv:2503.01224). At each scored answer
    position t with next token y and logits z_t, the target is ``q_t = softmax(z_t with z_t[y] = -inf)``
    computed from DETACHED logits (the model's distribution renormalised without y), and

        loss = mean_t CE(q_t, softmax(z_t)) = mean_t -sum_{v != y} q_t[v] log p_t[v]

    whose gradient in z_t is ``p_t - q_t``: it lowers y and raises every other token in proportion to
    its probability, and stays bounded as ``p_t(y) -> 0`` (unlike gradient ascent). The first
    ``ignore_first_n_answer_tokens`` labelled tokens of each row are not scored (the trick of the
    paper's training-settings footnote): their labels are set to IGNORE_INDEX before the shift.
    open-unlearning: ``cross_entropy_unlearning_loss`` and ``compute_batch_ceu`` in
    ``src/trainer/unlearn/ceu.py``; CEU is a forget-only method (no retain term).

    Defaults: ignore_first_n_answer_tokens 1, class ``CEU`` in ``src/trainer/unlearn/ceu.py`` (no
    ``configs/trainer/CEU.yaml`` in the index read).

    Same formula as open-unlearning (scored in float32; an answer-less batch gives 0, not NaN).
    """
    if ignore_first_n_answer_tokens < 0:
        raise ValueError(f"ignore_first_n_answer_tokens must be >= 0, got {ignore_first_n_answer_tokens}")
    labelled = labels != IGNORE_INDEX
    leading = labelled & (labelled.cumsum(dim=-1) <= ignore_first_n_answer_tokens)
    shifted_logits, shifted_labels, mask = _answer_positions(logits, labels.masked_fill(leading, IGNORE_INDEX))
    with torch.no_grad():
        safe_labels = shifted_labels.masked_fill(~mask, 0).unsqueeze(-1)
        target_logits = shifted_logits.detach().scatter(-1, safe_labels, float("-inf"))
        target = torch.softmax(target_logits, dim=-1)
    # target is 0 at y, so the (finite) log p_t(y) does not enter the sum.
    return _masked_mean(-(target * torch.log_softmax(shifted_logits, dim=-1)).sum(-1), mask)


def pdu_forget_loss(logits: torch.Tensor, labels: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
    """PDU's forget term: the squared logit margin ``(max_v z - mean_v z)^2``, driving outputs to uniform.

    Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language
    Models" (NeurIPS 2025, arXiv:2506.05314): the "logit-margin flattening" loss, zero exactly when all
    logits at a position are equal (the uniform distribution), so minimising it raises the entropy of
    the forget outputs. It needs no labels: ``labels`` only choose the positions. open-unlearning:
    ``PDU.compute_loss`` in ``src/trainer/unlearn/pdu.py``; PDU's defaults are listed at
    :func:`pdu_dual_update`.

    Positions, exactly as open-unlearning:

    - default (``pdu.py`` after PR #147, "masked loss PDU", by the paper's first author, who wrote that
      the earlier version "was not exactly what was introduced in the paper and lacked proper
      masking"): the UNSHIFTED positions t with ``labels[t] != IGNORE_INDEX``,
      ``sum_t m_t * gap_t / max(1, sum_t m_t)``. These are the positions whose INPUT token is an answer
      token: from the first answer token's position (predicting the second answer token) to the last
      labelled position (the EOS, predicting what follows it). This differs from the answer positions of
      the rest of this module (last prompt token to the second-to-last labelled token) by one position
      at each end; it is kept as open-unlearning has it.
    - ``all_positions=True`` (``pdu.py`` before PR #147): the plain mean over all B*T positions, prompt
      and padding included (``logits.reshape(-1, V)`` then ``.mean()``), not answer positions only.
    """
    flat = logits.float().reshape(-1, logits.shape[-1])
    gap = (flat.max(dim=-1).values - flat.mean(dim=-1)) ** 2
    if all_positions:
        return gap.mean()
    mask = (labels != IGNORE_INDEX).reshape(-1).to(gap.dtype)
    return (gap * mask).sum() / mask.sum().clamp(min=1)


def pdu_dual_update(
    weight: float, retain_loss: float | torch.Tensor, retain_loss_eps: float, dual_step_size: float
) -> float:
    """PDU's projected dual-ascent step on the retain weight: ``max(0, w + eta * (retain_loss - eps))``.

    Entesari et al. 2025 (arXiv:2506.05314) solve ``min forget(theta) s.t. retain(theta) <= eps`` by a
    primal-dual method; the retain weight ``w`` (open-unlearning's ``alpha``, ``preferences[1]``) is the
    dual variable. ``w`` grows while the retain loss is above ``eps`` and shrinks (projected at 0) while
    the constraint holds with slack. open-unlearning: ``PDU.final_loss_value`` and
    ``post_epoch_dual_param_update`` in ``src/trainer/unlearn/pdu.py``.

    How open-unlearning uses it: the objective at each step is
    ``gamma * forget + w * (retain - eps)``, i.e. the retain term is SHIFTED by ``eps`` (a constant in
    theta: it changes the reported loss, not the gradient, and is applied whether or not
    ``primal_dual`` is on). After that loss is formed with the current ``w``, and when
    ``primal_dual`` is on, ``dual_update_upon == "step"`` and the ``dual_warmup_epochs`` are over, ``w``
    is updated with this function from the step's (detached) retain loss; with ``"epoch"`` it is
    updated once per epoch from the retain loss averaged over the epoch's batches. The update never
    receives gradients (``.item()``); this function returns a Python float.

    Defaults (``PDU.__init__`` in ``src/trainer/unlearn/pdu.py``; no ``configs/trainer/PDU.yaml`` in the
    index read): retain_loss_eps 0.0, primal_dual False, dual_step_size 1.0, dual_update_upon "step",
    dual_warmup_epochs 0; the initial weights are GradDiff's gamma 1.0, alpha 1.0, retain NLL
    (``src/trainer/unlearn/grad_diff.py``).
    """
    if isinstance(retain_loss, torch.Tensor):
        retain_loss = retain_loss.detach().item()
    return max(0.0, float(weight) + float(dual_step_size) * (float(retain_loss) - float(retain_loss_eps)))


#: open-unlearning's default hyper-parameters. ``gamma`` weighs the forget term and ``alpha`` the
#: retain term (``gamma * forget + alpha * retain``, GradDiff's convention), as
#: :class:`UnlearningObjective`'s ``forget_weight`` and ``retain_weight``.
_PREFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    # configs/trainer/DPO.yaml: not in the index for locuslab/open-unlearning; the copy in the fork
    # zgoel317/open-unlearning@37b02f2516d6ae4f193262023776d57564b85fd8 (beta 0.1, alpha 1.0, gamma 1.0,
    # retain NLL), which docs/results.md@8f9872c26f27dc81cb9a5340fb0fc3671c65e031 confirms ("α = 1, γ = 1,
    # β = 0.1", lr 1e-5, 10 epochs, paged_adamw_32bit). The Python default is DPO(beta=1.0)
    # (src/trainer/unlearn/dpo.py@afcd6b6b7cb2b1511448cd3b7ea422d5e57e5285); gamma, alpha, retain_loss_type
    # are GradDiff's Python defaults (src/trainer/unlearn/grad_diff.py@f7656c77bbccb22215bea58199aee734ad7d641f).
    # IdkDPO = trainer DPO + data TOFU_QA_forget_idk (idk_path ./data/idk.jsonl, from the hub dataset
    # open-unlearning/idk); experiment configs/experiment/unlearn/tofu/idk.yaml (fork copy
    # zgoel317/open-unlearning@9be06255f99214251571822fa88d780d0c9a0833): lr 1e-5, 10 epochs,
    # weight_decay 0.01, warmup_epochs 1.0.
    "dpo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL"},
    # configs/trainer/RMU.yaml@8f9872c26f27dc81cb9a5340fb0fc3671c65e031 (method_args; defaults: GradDiff).
    # retain_loss_type null there: RMU's own retain term (EMBED_DIFF, activation_mse against the frozen
    # reference at module_regex) is used only when set to "EMBED_DIFF"; null falls through to GradDiff,
    # which raises NotImplementedError, so a run must override it. Earlier RMU.yaml versions (forks
    # zgoel317/open-unlearning@a8977042c79ec6aff7030245275216a3339372e4, Dornavineeth/open-unlearning@
    # e30348f9f31a3e6c6f9141ee669f1324c9368ad3) had steering_coeff 2, alpha 1, EMBED_DIFF and ALL
    # parameters trainable. The Python default steering_coeff is 20 (src/trainer/unlearn/rmu.py@afcd6b6b).
    "rmu": {
        "module_regex": r"model\.layers\.7",
        "trainable_params_regex": [r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"],
        "steering_coeff": 300.0,
        "alpha": 1000.0,
        "gamma": 1.0,
        "retain_loss_type": None,
    },
    # AltPO in open-unlearning is NOT a trainer of its own: community/methods/AltPO runs trainer=DPO on the
    # alternates file (data handler QAwithAlternateDataset, alternate_key "alternate", return_original true),
    # so its loss and defaults are DPO's (beta 0.1, gamma 1, alpha 1 = the retain weight, retain NLL).
    # README.md@9a788f6aa112d407ca459a1d5a9e18a5c6912e3b: grid beta {0.05, 0.1, 0.5}, lr {1e-5, 2e-5, 5e-5},
    # alpha {1, 2, 5}. run.sh (fork copy wzh4464/open-unlearning@b71de54c179408d447bc383c86fd1fafcc99dc14):
    # 2 epochs, batch 8 x 4 accumulation, alternates alt5_seed_0.json. generate.yaml (same fork): 5
    # alternates per question (repeats 5), do_sample, temperature 1.0, max_new_tokens 200, seed 0, prompt
    # INST_QAS_LLAMA3_TEMPLATE (prompts.py@5420d43e), generator = the fine-tuned target
    # open-unlearning/tofu_Llama-3.2-1B-Instruct_full. The authors' code (molereddy/Alternate-Preference-
    # Optimization, forget.py@2911a8fb / dataloader.py@2911a8fb, loss "subdpo"; config/unlearn_llama2.yaml
    # @1e5e3050): beta 0.1, retain_wt 1 (NLL), lr 5e-5, 10 epochs, batch 5 x 7, weight_decay 0.01.
    "altpo": {
        "beta": 0.1,
        "gamma": 1.0,
        "alpha": 1.0,
        "retain_loss_type": "NLL",
        "num_alternates": 5,
        "generation": {"do_sample": True, "temperature": 1.0, "max_new_tokens": 200, "seed": 0},
    },
}

#: RMU as published for Zephyr-7B (Li et al. 2024, "The WMDP Benchmark"): the centerforaisafety/wmdp
#: README command for Zephyr (``python3 -m rmu.unlearn --max_num_batches 150 --batch_size=4
#: --retain_corpora wikitext,wikitext --forget_corpora bio-forget-corpus,cyber-forget-corpus
#: --steering_coeffs 6.5,6.5 --alpha 1200,1200 --lr 5e-5 --seed 42``; a third-party note attributes it to
#: run_rmu_zephyr.ipynb, the run behind cais/Zephyr_RMU) with ``rmu/unlearn.py``'s defaults (layer_id 7,
#: layer_ids 5,6,7, param_ids 6, module "{model}.model.layers[{layer_id}]"). The wmdp repository is not
#: in the index searched: rmu/unlearn.py was read in the copy
#: manwaner333/wmdp_qing@9b7e128231b9f36e912a09aa84c9e7e52aecccf1, the command in forks quoting the README.
#: The paper's own text was not read. Parameter 6 of a Mistral decoder layer is ``mlp.down_proj.weight``, so
#: the trainable set equals open-unlearning's ``trainable_params_regex``. Per topic (bio, cyber) one
#: control vector and one alpha; forget text truncated at 512 (bio) / 768 (cyber) tokens, retain at 512.
#: The original loss is the UNMASKED mean over batch, positions (padding included) and hidden dim.
WMDP_RMU_ZEPHYR: dict[str, Any] = {
    "model": "HuggingFaceH4/zephyr-7b-beta",
    "layer_id": 7,
    "update_layer_ids": (5, 6, 7),
    "param_ids": (6,),
    "steering_coeff": 6.5,
    "alpha": 1200.0,
    "lr": 5e-5,
    "batch_size": 4,
    "max_num_batches": 150,
    "seed": 42,
}


def _sequence_log_ratio(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per sequence, ``log p(y|x) - log p_ref(y|x)`` summed over answer tokens [B] (reference detached)."""
    logprobs, _ = token_logprobs(logits, labels)
    with torch.no_grad():
        reference_logprobs, _ = token_logprobs(reference_logits.detach(), labels)
    return logprobs.sum(-1) - reference_logprobs.sum(-1)


def preference_margin(
    win_logits: torch.Tensor,
    win_labels: torch.Tensor,
    lose_logits: torch.Tensor,
    lose_labels: torch.Tensor,
    reference_win_logits: torch.Tensor,
    reference_lose_logits: torch.Tensor,
) -> torch.Tensor:
    """DPO's implicit reward margin per pair [B]: ``(log p(w) - log p_ref(w)) - (log p(l) - log p_ref(l))``."""
    if win_logits.shape[0] != lose_logits.shape[0]:
        raise ValueError(
            "the win and lose batches must be pairs (same rows): "
            f"got {win_logits.shape[0]} and {lose_logits.shape[0]} rows"
        )
    return _sequence_log_ratio(win_logits, win_labels, reference_win_logits) - _sequence_log_ratio(
        lose_logits, lose_labels, reference_lose_logits
    )


def dpo_loss(
    win_logits: torch.Tensor,
    win_labels: torch.Tensor,
    lose_logits: torch.Tensor,
    lose_labels: torch.Tensor,
    reference_win_logits: torch.Tensor,
    reference_lose_logits: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO on (win, lose) answer pairs against a frozen reference; for unlearning lose = the forget answer.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model". With ``r(y) = log p(y|x) - log p_ref(y|x)`` (answer-token log-probabilities summed over the
    sequence; ``p_ref`` the model before unlearning, detached):

        loss = mean_i  -(2 / beta) * log sigmoid(beta * (r(w_i) - r(l_i)))

    open-unlearning: ``compute_dpo_loss`` in ``src/trainer/utils.py`` (``compute_batch_nll`` sums the
    token cross-entropy per sequence; log-ratio = -(nll - nll_ref)), called by ``DPO.compute_unlearn_loss``
    (``src/trainer/unlearn/dpo.py``) with ``win_inputs = inputs["forget"]["alternate"]`` and
    ``lose_inputs = inputs["forget"]["original"]``. The ``2 / beta`` scaling is open-unlearning's (and
    NPO's), not the DPO paper's ``1``: it makes the loss ``2 log 2 / beta`` when the model equals the
    reference and the gradient ``beta``-free at that point. IdkDPO (TOFU, Maini et al. 2024) is this loss
    with an "I don't know" answer as w (:mod:`simu_core.data.idk`).

    Defaults: beta 0.1, gamma 1, alpha 1 (retain weight), retain NLL (``OPEN_UNLEARNING_DEFAULTS["dpo"]``).
    Same formula as open-unlearning; the only difference is float32 scoring (open-unlearning scores in
    the model's dtype, bf16 in its runs). A pair whose answers were both cut away contributes the constant
    ``2 log 2 / beta`` with zero gradient, as in open-unlearning (an all-ignored row sums to 0 there too).
    """
    margin = preference_margin(
        win_logits, win_labels, lose_logits, lose_labels, reference_win_logits, reference_lose_logits
    )
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def altpo_loss(
    alternate_logits: torch.Tensor,
    alternate_labels: torch.Tensor,
    forget_logits: torch.Tensor,
    forget_labels: torch.Tensor,
    reference_alternate_logits: torch.Tensor,
    reference_forget_logits: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AltPO's forget term: DPO with a model-written alternate answer preferred over the forget answer.

    Mekala et al. 2024, "Alternate Preference Optimization for Unlearning Factual Knowledge in Large
    Language Models" (arXiv:2409.13474, COLING 2025). Per (question x, forget answer y, alternate y~):

        loss = mean over pairs  -(2 / beta) * log sigmoid(beta * (r(y~) - r(y)))

    i.e. :func:`dpo_loss` with ``win = alternate`` and ``lose = forget``; the full objective adds
    ``alpha * NLL(retain)``. This is what both implementations run: the authors' code
    (molereddy/Alternate-Preference-Optimization, ``forget_loss=subdpo``: ``DPO(sub_inputs,
    forget_inputs, beta)`` + ``retain_wt * NLL(retain)`` in ``dataloader.py``) and open-unlearning
    (``community/methods/AltPO``: ``trainer=DPO`` on ``QAwithAlternateDataset``). There is no extra NLL
    term on the alternates (that variant is the authors' "subnpo"/"subdiff", not AltPO).

    The alternates are what make it AltPO: k = 5 per forget question, sampled from the fine-tuned
    (pre-unlearning) model itself (``do_sample``, temperature 1.0, max 200 new tokens, seed 0) with a
    prompt showing the question and the true answer and asking for another answer that changes its
    facts (``prompts.py``: ``INST_QAS_TEMPLATE`` for Llama-2, ``INST_QAS_LLAMA3_TEMPLATE`` for Llama-3.2).
    Each (question, answer, alternate) is its own forget row: the forget set is k times larger and each
    epoch sees every forget answer k times, each time against a different alternate. The mean over the
    batch therefore is the mean over alternates as well.

    Hyper-parameters: ``beta`` (DPO.yaml 0.1; AltPO README grid {0.05, 0.1, 0.5}); the retain weight
    ``alpha`` (GradDiff's, 1; grid {1, 2, 5}) is NOT an argument here: it is the objective's
    ``retain_weight``, as in open-unlearning. Same formula as open-unlearning (float32 scoring, as
    :func:`dpo_loss`).
    """
    return dpo_loss(
        alternate_logits,
        alternate_labels,
        forget_logits,
        forget_labels,
        reference_alternate_logits,
        reference_forget_logits,
        beta,
    )


def rmu_control_vector(hidden_size: int, steering_coeff: float, generator: torch.Generator) -> torch.Tensor:
    """RMU's fixed random direction [1, 1, hidden_size]: ``c * u / ||u||`` with ``u ~ U[0, 1)^d``.

    Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning"
    (Representation Misdirection for Unlearning). open-unlearning: ``RMU.get_control_vector``
    (``torch.rand(1, 1, dim)``, float32, drawn once and reused for the whole run). Here the draw uses
    ``generator`` (float32, on the generator's device), so the vector is reproducible from a seed and
    independent of the global RNG; a CPU generator seeded with s gives the same vector as open-unlearning
    after ``torch.manual_seed(s)`` when nothing else drew first. (The wmdp code draws in the model's
    dtype on its device, which gives other numbers for the same seed.) The norm is ``steering_coeff``
    (up to float32 rounding). Defaults: steering_coeff 300 (RMU.yaml); WMDP Zephyr-7B 6.5.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    if steering_coeff <= 0:
        raise ValueError(f"steering_coeff must be > 0, got {steering_coeff}")
    direction = torch.rand(1, 1, hidden_size, generator=generator, device=generator.device,
                           dtype=torch.float32)
    return direction / torch.norm(direction) * steering_coeff


def activation_mse(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's activation loss: masked squared error, mean over the hidden dim and the masked positions.

    For activations a [B, T, d], a target broadcastable to it (the control vector [1, 1, d] for the
    forget term, the frozen reference's activations [B, T, d] for the retain term) and mask m [B, T]:

        loss = mean_b  ( sum_t m[b,t] * mean_d (a[b,t,d] - target[b,t,d])^2 ) / sum_t m[b,t]

    open-unlearning: ``RMU.compute_activation_loss`` (``src/trainer/unlearn/rmu.py``). Its mask is
    ``labels != -100`` on the UNSHIFTED labels: the positions of the answer tokens themselves (the hidden
    state at an answer token; the last prompt token is excluded, the answer's last token included), for
    both the forget term and the EMBED_DIFF retain term. Pass :func:`rmu_answer_mask` (``labels !=
    IGNORE_INDEX``) to reproduce it. The hidden states are the output of decoder layer ``module_regex``
    (layer 7 by default: 0-based, ``model.layers.7``), read with a forward hook.

    Deliberate differences: computed in float32 (open-unlearning in the activations' dtype); the target
    is detached (it is a constant or the frozen reference's); a sequence without masked positions
    contributes 0 to the mean over sequences instead of open-unlearning's NaN (0 / 0). The original wmdp
    code instead averages over every position of the batch, padding and prompt included, unmasked.
    """
    if mask.shape != activations.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {list(activations.shape[:2])}, got {list(mask.shape)}")
    squared = (activations.float() - target.detach().float()).square().mean(-1)  # [B, T]
    weights = mask.to(squared.dtype)
    per_sequence = (squared * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    return per_sequence.mean()


def rmu_answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """open-unlearning's RMU mask [B, T]: ``labels != -100`` UNSHIFTED, the answer tokens' own positions.

    Not :func:`~simu_core.scoring.token_logprobs`'s mask (``labels[:, 1:]``, the positions that PREDICT an
    answer token): RMU reads the hidden state at each answer token, not at the token before it.
    """
    return labels != IGNORE_INDEX


#: open-unlearning's default hyper-parameters per loss (each entry names its source file above).
OPEN_UNLEARNING_DEFAULTS: dict[str, dict[str, Any]] = {**_TOKEN_DEFAULTS, **_PREFERENCE_DEFAULTS}
