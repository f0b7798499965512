"""What this node agrees to run, stated in `register` and checked again on every `assign`.

The coordinator's placement already respects the policy; the client checks each assignment
once more before it starts anything (an older coordinator, or one that is wrong, cannot make
it run what its operator did not allow). The checks themselves live in `shared.policy`.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpu_client.settings import ClientSettings
from shared.policy import HOOK_ENV, PolicyAsk, refusal
from shared.protocol import Assign, NodePolicy


def node_policy(settings: ClientSettings, executors: Iterable[str]) -> NodePolicy:
    """The policy sent in `register`: the executors offered and the operator's allow lists.
    The hook list is always forbidden; MESH_FORBIDDEN_ENV adds to it."""
    return NodePolicy(
        executors=list(executors),
        allowed_images=list(settings.allowed_images),
        allowed_volumes=list(settings.allowed_volumes),
        forbidden_env=list(dict.fromkeys((*HOOK_ENV, *settings.forbidden_env))),
        capabilities=list(settings.docker_caps),
    )


def ask_of(assign: Assign) -> PolicyAsk:
    return PolicyAsk(
        executor=assign.executor, image=assign.image or "", volumes=tuple(assign.volumes),
        env_names=tuple(assign.env),
    )


def assign_refusal(policy: NodePolicy, assign: Assign) -> str:
    """Why this node refuses `assign` ("" when it may run), worded for the task's error."""
    why = refusal(policy, ask_of(assign))
    return f"node policy: {why}" if why else ""
