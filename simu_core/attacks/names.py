"""The attacks' names and stages: pure Python (no torch), read by :mod:`simu_core.config` to validate
``attacks`` and by the flow to name each attack's cached stage.

| attack       | what it does to the model or the prompt                                   | setting read |
|--------------|---------------------------------------------------------------------------|--------------|
| ``quantize`` | weight-only quantization of every linear layer (``attack.quantize.bits``) | one per bit width |
| ``paraphrase`` | the benchmark's paraphrased forget questions instead of the originals  | - |
| ``in_context`` | ``attack.in_context.k`` other forget items (question and answer) before each measured question | k |
| ``logit_lens`` | the answer probability read from every layer's hidden state (final norm + unembedding) | per layer, max |
| ``relearn``  | a few fine-tuning steps on forget (or retain) items (the ``relearn`` section) | the last step |

Each attack runs once per model (the unlearned model, the target, the retain reference) in a stage of
its own, so the target's and the reference's attacks are shared by every method that unlearns them.
"""

from __future__ import annotations

#: Every attack, in the order the report shows them.
ATTACKS = ("quantize", "paraphrase", "in_context", "logit_lens", "relearn")
#: Attacks that change the prompt, not the model.
PROMPT_ATTACKS = ("paraphrase", "in_context")


def attack_stage(attack: str) -> str:
    """The cached stage that runs ``attack`` on one model (``relearn`` keeps its version-1 name)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {list(ATTACKS)}")
    return "relearn" if attack == "relearn" else f"attack_{attack}"


def attack_label(attack: str, model: str) -> str:
    """The flow's label of ``attack`` on ``model`` ('unlearned', 'target' or 'reference'): ``relearn``,
    ``relearn_target``, ``quantize_reference``... (the version-1 relearning labels are kept)."""
    return attack if model == "unlearned" else f"{attack}_{model}"
