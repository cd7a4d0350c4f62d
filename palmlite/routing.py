"""What a mixture of experts does with a mixture of domains: routing analysis.

Pathways' bet is that one sparse model serves many tasks by sending each to the experts
that suit it. These functions measure whether a trained palmlite MoE does that, on the
validation windows of a ``mix:`` corpus (``palmlite.mixture``):

- ``expert_use``: the share of each domain's token-slots that every expert of every MoE
  layer receives, Z x L x E (a heatmap per layer; rows sum to 1).
- ``token_routing``: the same, for chosen token ids only (digits, ``=``, ``(``, newline...):
  the control that separates domain specialisation from vocabulary. A token id routed the
  same way in every domain means the experts follow the token, not the domain.
- ``specialisation``: one number per layer, the mutual information between domain and expert
  (in bits; 0 when every domain uses the experts alike, log2 Z at most).
- ``knock_out`` / ``knock_out_losses``: an expert's output weights at zero, so the tokens
  routed to it keep only the residual (as if dropped), and the loss each domain loses.

Shapes: Z domains, L MoE layers, E experts, K experts per token, N windows, T length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palmlite.config import ModelConfig, MoEConfig
from palmlite.evaluate import evaluate_domains
from palmlite.mixture import MixtureDataset, domain_windows
from palmlite.presets import dense_twin

# Notebook 11's four models of one mixture, at equal active FLOPs per token.
ARCHS = {"dense": "dense twin", "token": "token-routed MoE (Switch, GLaM)",
         "task": "task-routed MoE (Task-MoE)", "fixed": "fixed domain -> expert map"}


def arch_configs(base: ModelConfig, moe: MoEConfig, n_domains: int) -> dict[str, ModelConfig]:
    """{arch: config} for ``ARCHS``: ``base`` with ``moe`` routed by token, by task and by a
    fixed map (``n_domains`` known to the last two), and the dense twin of the token-routed
    one (``presets.dense_twin``): every model spends the same FLOPs per token in its FFNs."""
    routed = {arch: base.replace(moe=moe.replace(
        routing=arch, n_domains=None if arch == "token" else n_domains))
        for arch in ("token", "task", "fixed")}
    return {"dense": dense_twin(routed["token"]), **routed}


@nnx.jit
def _chosen_experts(model, tokens_BxT, domains_B):
    """Each MoE layer's chosen experts, int32 [L, B, T, K] (forward only)."""
    _, _, stats = model.forward(tokens_BxT, domains=domains_B)
    return jnp.stack([s.experts_BxTxK for s in stats])


def routed_experts(model, windows: dict, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [N, T], chosen experts [L, N, T, K]) of the windows {"tokens": [N, T+1],
    "domains": [N]}, every whole batch of them (a batch: at most all the windows)."""
    if model.cfg.moe is None:
        raise ValueError("routing analysis needs a mixture of experts: ModelConfig.moe is None")
    tokens, domains = windows["tokens"], windows["domains"]
    if len(tokens) == 0:
        raise ValueError("no windows to route: the validation split is shorter than seq_len")
    batch_size = min(batch_size, len(tokens))
    n = len(tokens) // batch_size * batch_size
    chosen = [np.asarray(_chosen_experts(model, jnp.asarray(tokens[i:i + batch_size, :-1]),
                                         jnp.asarray(domains[i:i + batch_size])))
              for i in range(0, n, batch_size)]
    return np.asarray(tokens[:n, :-1]), np.concatenate(chosen, axis=1)


def _shares(chosen_LxNxTxK: np.ndarray, keep_NxT: np.ndarray, n_experts: int) -> np.ndarray:
    """Share of the kept token-slots each expert receives, per layer: [L, E] (NaN rows when
    nothing is kept)."""
    picked = chosen_LxNxTxK[:, keep_NxT]  # [L, kept tokens, K]
    counts_LxE = np.stack([np.bincount(layer.reshape(-1), minlength=n_experts)
                           for layer in picked]).astype(np.float64)
    total = counts_LxE.sum(-1, keepdims=True)
    return np.divide(counts_LxE, total, out=np.full_like(counts_LxE, np.nan), where=total > 0)


def expert_use(model, dataset: MixtureDataset, seq_len: int, batch_size: int = 8,
               max_windows: int | None = 64) -> np.ndarray:
    """Z x L x E: the share of domain z's token-slots that layer l sends to expert e."""
    E = model.cfg.moe.n_experts
    out = []
    for windows in domain_windows(dataset, seq_len, max_windows):
        tokens_NxT, chosen = routed_experts(model, windows, batch_size)
        out.append(_shares(chosen, np.ones(tokens_NxT.shape, bool), E))
    return np.stack(out)


def token_routing(model, dataset: MixtureDataset, token_ids: dict[str, int], seq_len: int,
                  batch_size: int = 8, max_windows: int | None = 64) -> dict:
    """The token-identity control: for each named token id, Z x L x E expert shares of its
    occurrences in each domain (NaN where a domain never has that token), and the counts."""
    E = model.cfg.moe.n_experts
    shares = {name: [] for name in token_ids}
    counts = {name: [] for name in token_ids}
    for windows in domain_windows(dataset, seq_len, max_windows):
        tokens_NxT, chosen = routed_experts(model, windows, batch_size)
        for name, token in token_ids.items():
            keep_NxT = tokens_NxT == token
            shares[name].append(_shares(chosen, keep_NxT, E))
            counts[name].append(int(keep_NxT.sum()))
    return dict(shares={n: np.stack(v) for n, v in shares.items()}, counts=counts)


def specialisation(use_ZxLxE: np.ndarray, weights_Z: np.ndarray) -> np.ndarray:
    """Mutual information I(domain; expert) per layer, in bits, with domains weighted as the
    mixture samples them: H(expert) - H(expert | domain)."""
    w_Zx1x1 = np.asarray(weights_Z, np.float64)[:, None, None]
    entropy = lambda p: -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), -1)
    marginal_LxE = np.sum(w_Zx1x1 * use_ZxLxE, axis=0)
    return entropy(marginal_LxE) - np.sum(w_Zx1x1[:, :, 0] * entropy(use_ZxLxE), axis=0)


def knock_out(model, layer: int, expert: int):
    """A copy of ``model`` whose MoE layer ``layer`` (a block index) has expert ``expert``'s
    output weights at zero: tokens routed to it keep only the residual (and a shared expert)."""
    moe = model.blocks[layer].mlp
    if not hasattr(moe, "down_ExFxD"):
        raise ValueError(f"layer {layer} is not a mixture of experts (ModelConfig.moe.every="
                         f"{model.cfg.moe.every}: layers {moe_layers(model)})")
    if not 0 <= expert < moe.n_experts:
        raise ValueError(f"expert={expert} is invalid: expected 0 .. {moe.n_experts - 1}")
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    down = copy.blocks[layer].mlp.down_ExFxD
    down[...] = down[...].at[expert].set(0)
    return copy


def moe_layers(model) -> list[int]:
    """Block indices of the MoE layers."""
    return [i for i in range(model.cfg.n_layers) if model.cfg.is_moe_layer(i)]


def knock_out_losses(model, dataset: MixtureDataset, seq_len: int, batch_size: int = 8,
                     max_batches: int | None = 4) -> dict:
    """Δ validation loss per domain (nats/token) when each expert of each MoE layer is knocked
    out alone: {"base": {domain: loss}, "delta": array [L, E, Z]}."""
    run = lambda m: evaluate_domains(m, dataset, seq_len, batch_size, max_batches)[
        "val_loss_by_domain"]
    base = run(model)
    delta = np.array([[[run(knock_out(model, layer, e))[name] - base[name]
                        for name in dataset.names]
                       for e in range(model.cfg.moe.n_experts)]
                      for layer in moe_layers(model)])
    return dict(base=base, delta=delta)


def analysis(model, dataset: MixtureDataset, seq_len: int, batch_size: int = 8,
             max_windows: int | None = 64) -> dict:
    """What notebook 11 records per model: the domains, their weights, and for an MoE its
    expert use (Z x L x E, as lists) and I(domain; expert) per MoE layer."""
    out = dict(domains=list(dataset.names), weights=dataset.weights.tolist())
    if model.cfg.moe is not None:
        use = expert_use(model, dataset, seq_len, batch_size, max_windows)
        out.update(expert_use=use.tolist(),
                   specialisation=specialisation(use, dataset.weights).tolist())
    return out
