"""Distil a layer's fused side-net from its grouped sidecar (issue #6), and measure how closely it follows it.

Targets are the runtime's own feature rule (`steering.runtime.grouped_delta`) on activations held in memory: the
harmful and benign prompts' hooked outputs, so the mix holds tokens where the sidecar does nothing (target 0). Each
step draws tokens and an alpha per behaviour (each behaviour off half the time, else uniform up to `alpha_max`), so
the FiLM gates learn every combination; the net starts from the exact fold (`FusedNet.from_sidecar`) and training
removes what the fold adds where a group stays within epsilon. Only tensors and error statistics come out."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sae_pipeline.behaviors.release import LayerGroups
from sae_pipeline.config import FusedConfig
from sae_pipeline.fused.net import FusedNet
from sae_pipeline.steering.runtime import FeatureGroups, FusedSideNet, grouped_delta
from sae_pipeline.steering.sidecar import DenseSidecar

RELATIVE_FLOOR = 1e-6  # issue #6: ||delta_hat - delta|| / (||delta|| + 1e-6)


class Teacher(NamedTuple):
    """What the net imitates: a layer's grouped sidecar under the runtime's rule, in float32. Called as a side net
    (runtime.FusedSideNet) it is that rule in float32 arithmetic: the evaluation's control for how far arithmetic
    alone moves greedy decoding (the sidecar hook computes in float32 on a CPU too, in the activations' dtype on a
    GPU)."""

    sidecar: DenseSidecar
    groups: FeatureGroups  # member_NG: whose rows are whose; alpha_G: the release's alphas (training draws its own)
    epsilon: float

    @classmethod
    def of(cls, groups: LayerGroups, epsilon: float) -> Teacher:
        """A release layer's grouped sidecar, its behaviours at the release's alphas."""
        return cls(groups.sidecar, FeatureGroups.of(groups.sizes, groups.alphas), epsilon)

    @property
    def behaviors(self) -> tuple[str, ...]:
        return self.groups.names

    @property
    def d_model(self) -> int:
        return self.sidecar.A_sel_ND.shape[1]

    def delta(self, acts_ND: torch.Tensor, alphas_G: torch.Tensor) -> torch.Tensor:
        z_NF = torch.relu(acts_ND.float() @ self.sidecar.B_sel_ND.float().T - self.sidecar.tau_N.float())
        return grouped_delta(z_NF, self.sidecar.A_sel_ND.float(), self.groups.member_NG, alphas_G.float(),
                             self.epsilon)[0]

    def __call__(self, acts: torch.Tensor, alphas_G: torch.Tensor) -> torch.Tensor:
        return self.delta(acts, alphas_G.cpu()).to(acts.dtype)


class FusedErrors(NamedTuple):
    """How a net follows its teacher on held-out tokens at one set of alphas."""

    median_relative: float  # over the tokens the sidecar steers: ||delta_hat - delta|| / (||delta|| + 1e-6)
    p95_relative: float
    unsteered_p95_norm: float  # ||delta_hat|| where the sidecar leaves the token alone
    gates_off_p95_norm: float  # ||delta_hat|| with every alpha at 0
    # over the steered tokens, p95 of the relative gap between delta_hat(a + b) and delta_hat(a) + delta_hat(b)
    composition_p95_relative: float
    steered_tokens: int
    tokens: int


def _alpha_draw(generator: torch.Generator, behaviors: int, alpha_max: float) -> torch.Tensor:
    on_G = torch.rand(behaviors, generator=generator) < 0.5
    return torch.rand(behaviors, generator=generator) * alpha_max * on_G


@torch.no_grad()
def fused_errors(net: FusedSideNet, teacher: Teacher, acts_ND: torch.Tensor, alphas_G: torch.Tensor
                 ) -> FusedErrors:
    """Any backend's net (PyTorch, ONNX, INT8) against the teacher at alphas_G."""
    acts_ND = acts_ND.float()
    target_ND, got_ND = teacher.delta(acts_ND, alphas_G), net(acts_ND, alphas_G)
    steered_N = target_ND.norm(dim=-1) > 0
    relative_N = (got_ND - target_ND).norm(dim=-1)[steered_N] / (target_ND.norm(dim=-1)[steered_N] + RELATIVE_FLOOR)
    quantile = lambda values, q: float(values.quantile(q)) if len(values) else 0.0  # noqa: E731
    # composition: split the alphas in two random halves of each behaviour's strength
    share_G = torch.rand(len(alphas_G), generator=torch.Generator().manual_seed(0))
    first_ND, second_ND = net(acts_ND, alphas_G * share_G), net(acts_ND, alphas_G * (1 - share_G))
    gap_N = (first_ND + second_ND - got_ND).norm(dim=-1) / (got_ND.norm(dim=-1) + RELATIVE_FLOOR)
    return FusedErrors(quantile(relative_N, 0.5), quantile(relative_N, 0.95),
                       quantile(got_ND.norm(dim=-1)[~steered_N], 0.95),
                       quantile(net(acts_ND, torch.zeros_like(alphas_G)).norm(dim=-1), 0.95),
                       quantile(gap_N[steered_N], 0.95), int(steered_N.sum()), len(acts_ND))


class DistillResult(NamedTuple):
    losses: list[float]  # per step: the batch's squared error over its squared target norm (scale-free)
    kept_step: int  # the step whose weights were kept (0: the fold itself)
    validation: FusedErrors  # of the kept weights
    train_tokens: int
    validation_tokens: int


def _score(errors: FusedErrors) -> tuple[float, float]:
    """Lower is better: the issue's p95 relative error first, then the unsteered tokens' p95 norm."""
    return errors.p95_relative, errors.unsteered_p95_norm


def distill(net: FusedNet, teacher: Teacher, acts_ND: torch.Tensor, validation_ND: torch.Tensor,
            alphas_G: torch.Tensor, steps: int, batch_tokens: int, lr: float, alpha_max: float, seed: int,
            validate_every: int = 50) -> DistillResult:
    """Train `net` in place towards the teacher, from wherever it starts (the fold), and keep the weights that
    follow the teacher best on `validation_ND` at the release's alphas (checked at step 0 and every
    `validate_every` steps): where the fold is already exact, training cannot make it worse."""
    generator = torch.Generator().manual_seed(seed)
    best_errors = fused_errors(net, teacher, validation_ND, alphas_G)
    best = (0, {k: v.clone() for k, v in net.state_dict().items()})
    _wake_unused_units(net, generator)
    acts_ND = acts_ND.float()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for step in tqdm(range(1, steps + 1), desc="distil fused net", unit="step"):
        rows = torch.randint(len(acts_ND), (batch_tokens,), generator=generator)
        drawn_G = _alpha_draw(generator, len(net.behaviors), alpha_max)
        target_ND = teacher.delta(acts_ND[rows], drawn_G)
        error = (net(acts_ND[rows], drawn_G) - target_ND).pow(2).sum()
        loss = error / target_ND.pow(2).sum().clamp(min=RELATIVE_FLOOR)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % validate_every == 0 or step == steps:
            errors = fused_errors(net, teacher, validation_ND, alphas_G)
            if _score(errors) < _score(best_errors):
                best_errors, best = errors, (step, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[1])
    return DistillResult(losses, best[0], best_errors, len(acts_ND), len(validation_ND))


def fit(net: FusedNet, teacher: Teacher, tokens_ND: torch.Tensor, cfg: FusedConfig) -> DistillResult:
    """`distill` with the profile's settings: a seeded split of the tokens into training and validation
    (cfg.validation_fraction), validated at the teacher's (the release's) alphas."""
    order = torch.randperm(len(tokens_ND), generator=torch.Generator().manual_seed(cfg.seed))
    cut = int(len(tokens_ND) * (1 - cfg.validation_fraction))
    return distill(net, teacher, tokens_ND[order[:cut]], tokens_ND[order[cut:]], teacher.groups.alpha_G, cfg.steps,
                   cfg.batch_tokens, cfg.lr, cfg.alpha_max, cfg.seed)


@torch.no_grad()
def _wake_unused_units(net: FusedNet, generator: torch.Generator) -> None:
    """Hidden units the fold left at 0 get small random weights: at exactly 0 no gradient reaches them."""
    unused_H = (net.film_GH == 0).all(0) & (net.W2_DH == 0).all(0)
    count, d_model = int(unused_H.sum()), net.W1_HD.shape[1]
    if count == 0:
        return
    net.W1_HD[unused_H] = torch.randn(count, d_model, generator=generator) / d_model ** 0.5
    net.film_GH[:, unused_H] = 1e-3 * torch.randn(len(net.behaviors), count, generator=generator)
    net.W2_DH[:, unused_H] = 1e-3 * torch.randn(d_model, count, generator=generator)
