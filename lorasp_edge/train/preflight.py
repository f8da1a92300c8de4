"""What a training run checks before the model loads: the plan against the model it will run on.

The plan file is the trainer's contract, and a hand-edited or borrowed plan can name what the model
does not have. Each of these would otherwise surface after the (slow) load, as a PEFT or index
error deep in the forward, or not at all (a plan for another model trains with a guard sized for
that model):

    model       the plan's model and --model have the same shape (type, layers, parameters)
    layers      every adapted layer index is below the model's layer count
    modules     every target module is a linear layer of the model's family
    seq_len     within the model's context (max_position_embeddings)

The trainer reports these with the flags' problems, all at once in one line (UserError, exit 2).
"""

from __future__ import annotations

from lorasp_edge.errors import UserError
from lorasp_edge.plan.catalog import Architecture, model_info
from lorasp_edge.plan.planfile import Plan


def model_architecture(name: str) -> Architecture:
    """The shape of the model `name` names: catalog entry or local folder, else a hub id's config
    from the local hub cache."""
    try:
        return model_info(name).architecture
    except UserError as unknown:
        from transformers import AutoConfig

        from lorasp_edge.sources import resolve_model

        try:
            config = AutoConfig.from_pretrained(resolve_model(name)).get_text_config(decoder=True)
        except (OSError, ValueError):
            raise unknown from None
        return Architecture.from_config(config.to_dict(), source=name)


def plan_problems(plan: Plan, model_name: str, model_given: bool) -> list[str]:
    """Why `plan` cannot train `model_name`, one sentence each; [] when it can."""
    arch = model_architecture(model_name)
    problems = []
    planned = plan.model
    params = arch.parameters()["total"]
    same_shape = planned.get("params") == params and planned.get("model_type", arch.model_type) == arch.model_type \
        and planned.get("num_layers", arch.num_layers) == arch.num_layers
    if not same_shape:
        where = "--model" if model_given else "the plan's model"
        problems.append(
            f"the plan was made for {planned.get('name')} ({planned.get('params', 0) / 1e6:,.1f}M parameters), but {where} "
            f"{model_name} has {params / 1e6:,.1f}M ({arch.model_type}, {arch.num_layers} layers): plan for this model "
            f"(lorasp-edge plan --model {model_name}) or leave out --model"
        )
        return problems  # the other checks would only restate the mismatch
    beyond = [layer for layer in plan.layers if layer >= arch.num_layers]
    if beyond:
        problems.append(f"the plan's layers {beyond} are not in the model, which has layers 0-{arch.num_layers - 1}")
    known = arch.module_names()
    unknown = [name for name in plan.target_modules if name not in known]
    if unknown:
        problems.append(f"the plan's target_modules {unknown} are not linear layers of this {arch.model_type} model (it has {', '.join(known)})")
    if arch.max_positions and plan.seq_len > arch.max_positions:
        problems.append(f"the plan's seq_len {plan.seq_len} is longer than the model's context of {arch.max_positions} tokens")
    return problems
