"""Causal screen: does nudging a ranked SAE latent at its hook change whether the model refuses?

For candidate latent j (the ranking's top by delta_mu) the hooked MLP output is shifted on every token by
s * sigmas * sigma_j * W_dec[j], with sigma_j the std of z_j over the tuning prompts' tokens and s = -1 (the latent
removed, as the runtime's feature rule does) or s = +1 (amplified).
  stage 1, every candidate and both signs: mean teacher-forced log-prob of a canonical refusal on a harmful sample;
  stage 2, the `decode_candidates` whose best sign moved that log-prob most: greedy replies (up to max_new_tokens)
    on a harmful mini-batch per seed, both signs, judged for refusal; then, at the sign that raised refusal more
    (the wanted sign), the false-refusal rate on the benign prompts.
Selection: a latent must raise harmful refusal in every seed's mini-batch (an effect in the wanted direction that
one batch's noise does not explain: a mean gain of one prompt in one seed kept noise before) without raising the
benign false-refusal rate by more than `max_benign_spike`; of those the `keep` with the largest gain (ties: the
log-prob shift) are kept, each with its wanted sign. None may qualify: then the layer has no steering
features and the evaluation runs the refusal mode alone.
Stage 2 stops measuring what cannot change the selection: the seeds stop once both signs have a gain <= 0 (neither
can then be kept, whichever is wanted), and the benign prompts are decoded only for a wanted sign that raised
refusal in every seed. The kept features are the ones a full measurement keeps; a record says how many seeds it
decoded and leaves the benign change None where it was not measured.
Replies live in memory only: the judge reads them and they are dropped; only rates and log-probs are returned.
Each finished measurement is appended to a journal, so an interrupted screen resumes where it stopped and a change
of the selection settings re-selects without measuring again."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.config import FeatureConfig
from sae_pipeline.evaluation.generation import CANONICAL_REFUSAL, chat_ids, continuation_logprobs, generate_greedy
from sae_pipeline.evaluation.judges import RefusalJudge
from sae_pipeline.features.scoring import user_token_outputs
from sae_pipeline.hashing import config_hash
from sae_pipeline.model.hooks import mlp_module
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.sidecar import DenseSidecar

SIGNS = (-1, 1)
SELECTION_SETTINGS = ("screen_keep", "screen_max_benign_spike")  # choose among measurements, change none


class ScreenResult(NamedTuple):
    records: list[dict]  # one per candidate: sigma, log-prob shifts, refusal changes, selected
    selected: list[int]  # feature ids kept, strongest first
    signs: list[int]  # the wanted sign of each kept feature
    baseline: dict  # the unpatched rates the changes are measured against


@torch.no_grad()
def latent_sigmas(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sae: TopKSAE, layer: int,
                  prompts: Sequence[str], feature_ids: Sequence[int], batch_size: int = 16) -> torch.Tensor:
    """Std of each latent's z over the user tokens of the prompts (zeros where it does not fire included)."""
    ids_F = torch.tensor(list(feature_ids))
    sums_F, squares_F, tokens = torch.zeros(len(ids_F), dtype=torch.float64), torch.zeros(
        len(ids_F), dtype=torch.float64), 0
    for _, captured in user_token_outputs(model, tokenizer, prompts, [layer], batch_size, f"sigmas L{layer}"):
        codes = sae.encode(captured[layer].float().cpu())
        z_SF = torch.zeros(codes.top_acts.shape[0], sae.n_latents).scatter_(1, codes.top_indices, codes.top_acts)
        z_SC = z_SF[:, ids_F].double()
        sums_F += z_SC.sum(0)
        squares_F += (z_SC ** 2).sum(0)
        tokens += z_SC.shape[0]
    mean_F = sums_F / max(tokens, 1)
    return (squares_F / max(tokens, 1) - mean_F ** 2).clamp(min=0).sqrt().float()


@contextmanager
def shifted_output(model: PreTrainedModel, layer: int, shift_D: torch.Tensor) -> Iterator[None]:
    """Add a fixed vector to the layer's MLP output on every token while the block runs."""
    def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return output + shift_D.to(output.device, output.dtype)

    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class Journal:
    """Finished measurements, one JSON line each under a header naming everything they depend on; a different
    header starts afresh, a torn last line (an interruption) is measured again."""

    def __init__(self, path: Path | None, key: str):
        self.path, self.done = path, {}
        if path is None:
            return
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and _header_key(lines[0]) == key:
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                self.done[entry["step"]] = entry["value"]
            path.write_text("".join(line + "\n" for line in lines[:1 + len(self.done)]))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key}) + "\n")

    def measure(self, step: str, compute: Callable[[], object]):
        if step not in self.done:
            self.done[step] = compute()
            if self.path is not None:
                with self.path.open("a") as out:
                    out.write(json.dumps({"step": step, "value": self.done[step]}) + "\n")
        return self.done[step]


def _header_key(line: str) -> str | None:
    try:
        return json.loads(line).get("key")
    except (ValueError, AttributeError):  # a header torn by an interruption: start afresh
        return None


def journal_key(measured_by: dict, candidates: Sequence[int], harmful: Sequence[str], benign: Sequence[str],
                cfg: FeatureConfig) -> str:
    """measured_by: what else decides a measurement (the SAE's, model's and judge's hashes, the dtype)."""
    measuring = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in SELECTION_SETTINGS}
    return config_hash({"measured_by": measured_by, "candidates": list(map(int, candidates)),
                        "harmful": list(harmful), "benign": list(benign), "config": measuring})


def _refusal_rate(model, tokenizer, judge: RefusalJudge, ids: list[list[int]], cfg: FeatureConfig, desc: str
                  ) -> float:
    generations = generate_greedy(model, tokenizer, ids, cfg.screen_max_new_tokens, cfg.batch_size, desc)
    replies = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generations]
    refused = [p >= 0.5 for p in judge.refusal_probability(replies)]
    del replies  # replies to harmful prompts never leave this function
    return sum(refused) / max(len(refused), 1)


def seed_gains(measure: Callable[[int, int], float], seeds: int) -> dict[int, list[float]]:
    """measure(sign, seed) -> harmful refusal gain, for both signs seed by seed while either sign could still be kept
    (a gain > 0 in every seed so far): once both have a gain <= 0 no further seed can change the selection.
    Both signs are measured alike, so a surviving sign's total is compared with its rival's over the same seeds."""
    gains: dict[int, list[float]] = {sign: [] for sign in SIGNS}
    for seed in range(seeds):
        if seed and all(min(values) <= 0 for values in gains.values()):
            break
        for sign in SIGNS:
            gains[sign].append(measure(sign, seed))
    return gains


def screen_features(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sae: TopKSAE, layer: int,
                    candidates: Sequence[int], harmful: Sequence[str], benign: Sequence[str], judge: RefusalJudge,
                    cfg: FeatureConfig, journal: Journal | None = None,
                    directions: dict[int, torch.Tensor] | None = None) -> ScreenResult:
    """Screen `candidates` (feature ids, best ranked first) on the tuning prompts; see the module docstring.
    directions: feature id -> the unit direction steering would move it along (default its decoder row; a behaviour
    whose direction was deflated against the others' is screened along that)."""
    journal = journal or Journal(None, "")
    harmful_ids = [chat_ids(tokenizer, p) for p in harmful]
    benign_ids = [chat_ids(tokenizer, p) for p in benign[:cfg.screen_benign_prompts]]
    sample_ids = random.Random(cfg.seed).sample(harmful_ids, min(cfg.screen_harmful_batch * 2, len(harmful_ids)))
    batches = [random.Random(cfg.seed + 1 + s).sample(harmful_ids, min(cfg.screen_harmful_batch, len(harmful_ids)))
               for s in range(cfg.screen_seeds)]
    refusal_ids = tokenizer(CANONICAL_REFUSAL, add_special_tokens=False)["input_ids"]

    def logprob() -> float:
        scores = continuation_logprobs(model, tokenizer, sample_ids, refusal_ids, cfg.batch_size)
        return sum(scores) / len(scores)

    sigmas_F = latent_sigmas(model, tokenizer, sae, layer, list(harmful) + list(benign), candidates,
                             cfg.batch_size)
    baseline = journal.measure("baseline", lambda: {
        "refusal_logprob": logprob(),
        "harmful_refusal_by_seed": [_refusal_rate(model, tokenizer, judge, b, cfg, "screen baseline")
                                    for b in batches],
        "benign_false_refusal": _refusal_rate(model, tokenizer, judge, benign_ids, cfg, "screen baseline")})

    def shift(feature: int, sigma: float) -> torch.Tensor:
        direction_D = (directions or {}).get(feature, sae.W_dec_FD[feature].detach())
        return direction_D.float() * cfg.screen_sigmas * sigma

    def logprob_shifts(feature: int, sigma: float) -> dict:
        shifts = {}
        for sign in SIGNS:
            with shifted_output(model, layer, sign * shift(feature, sigma)):
                shifts[sign] = logprob() - baseline["refusal_logprob"]
        return {"logprob_shift_minus": shifts[-1], "logprob_shift_plus": shifts[1]}

    def harmful_gain(feature: int, sigma: float, sign: int, seed: int) -> float:
        with shifted_output(model, layer, sign * shift(feature, sigma)):
            return (_refusal_rate(model, tokenizer, judge, batches[seed], cfg, "screen harmful")
                    - baseline["harmful_refusal_by_seed"][seed])

    def decoded_effects(feature: int, sigma: float) -> dict:
        gains = seed_gains(lambda sign, seed: harmful_gain(feature, sigma, sign, seed), len(batches))
        wanted = max(SIGNS, key=lambda s: (sum(gains[s]), s == -1))  # ties: removal, the runtime's default
        benign_change = None
        if min(gains[wanted]) > 0:
            with shifted_output(model, layer, wanted * shift(feature, sigma)):
                benign_change = (_refusal_rate(model, tokenizer, judge, benign_ids, cfg, "screen benign")
                                 - baseline["benign_false_refusal"])
        return {"wanted_sign": wanted, "seeds_decoded": len(gains[wanted]),
                "harmful_refusal_gain_minus": sum(gains[-1]) / len(gains[-1]),
                "harmful_refusal_gain_plus": sum(gains[1]) / len(gains[1]),
                "harmful_refusal_gain_by_seed": gains[wanted], "benign_false_refusal_change": benign_change}

    records = []
    for feature, sigma in tqdm(list(zip(candidates, sigmas_F.tolist())), desc=f"screen l{layer} log-prob"):
        records.append({"feature_id": int(feature), "sigma": sigma, "decoded": False, "selected": False,
                        **journal.measure(f"logprob/{feature}", lambda: logprob_shifts(feature, sigma))})

    shortlist = sorted(records, key=lambda r: -max(r["logprob_shift_minus"], r["logprob_shift_plus"]))
    for record in tqdm(shortlist[:cfg.screen_decode_candidates], desc=f"screen l{layer} decode"):
        effects = journal.measure(f"decode/{record['feature_id']}",
                                  lambda: decoded_effects(record["feature_id"], record["sigma"]))
        gain = sum(effects["harmful_refusal_gain_by_seed"]) / len(effects["harmful_refusal_gain_by_seed"])
        change = effects["benign_false_refusal_change"]
        record.update({**effects, "decoded": True, "harmful_refusal_gain": gain,
                       "benign_spike": None if change is None else change > cfg.screen_max_benign_spike})

    eligible = [r for r in records if r["decoded"] and r["benign_spike"] is False
                and min(r["harmful_refusal_gain_by_seed"]) > 0]
    eligible.sort(key=lambda r: (-r["harmful_refusal_gain"],
                                 -(r["logprob_shift_minus"] if r["wanted_sign"] < 0 else r["logprob_shift_plus"])))
    kept = eligible[:cfg.screen_keep]
    for record in kept:
        record["selected"] = True
    return ScreenResult(records, [r["feature_id"] for r in kept], [r["wanted_sign"] for r in kept], baseline)


def sidecar_from_sae(sae: TopKSAE, feature_ids: Sequence[int], signs: Sequence[int]) -> DenseSidecar:
    """The selected latents as a sidecar on raw MLP outputs: B_sel = encoder columns, tau = -(pre-activation offset)
    so that s - tau is the SAE's pre-activation, A_sel = decoder rows oriented so that the runtime's subtraction
    moves each latent in its wanted sign (sign -1: removal, A_sel = W_dec; sign +1: amplification, A_sel = -W_dec)."""
    ids = torch.tensor(list(feature_ids), dtype=torch.long)
    orient_N1 = -torch.tensor(list(signs), dtype=torch.float32)[:, None]
    with torch.no_grad():
        B_sel_ND = sae.W_enc_DF[:, ids].T.float().contiguous()
        tau_N = (sae.b_dec_D.float() @ sae.W_enc_DF[:, ids].float() - sae.b_enc_F[ids].float()).contiguous()
        A_sel_ND = (sae.W_dec_FD[ids].float() * orient_N1).contiguous()
    return DenseSidecar(A_sel_ND, B_sel_ND, tau_N).validate()
