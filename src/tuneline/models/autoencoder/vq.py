"""Kind vq: a VQ autoencoder (diffusers VQModel) whose codebook is updated by an exponential moving
average, not by the optimizer, trained against the kl kind's PatchGAN with the same adaptive weight.

The seed is taming-transformers' EMAVQ (taming/models/vqgan.py) with its EMAVectorQuantizer and
EmbeddingEMA (taming/modules/vqvae/quantize.py), the EMA of VQ-VAE (van den Oord et al. 2017,
appendix A.1) with the Laplace smoothing of VQ-VAE-2's implementation. Per training forward, on the
codes the encodings were assigned to (nearest code, before the update):

    N_i <- decay * N_i + (1 - decay) * n_i               n_i: encodings assigned to code i
    m_i <- decay * m_i + (1 - decay) * sum of those encodings
    n = sum_i N_i;  N~_i = (N_i + eps) / (n + K * eps) * n       Laplace smoothing
    e_i <- m_i / N~_i

with N (cluster sizes) starting at 0 and m (embedding sums) at the initial codebook, as taming's. The
codebook is no trained parameter (requires_grad False, in no optimizer: "the quantizer's parameters
are not in the optimizer"); the trainer checkpoints it and N, m through `state_tensors`. The loss is
the kl kind's (reconstruction, perceptual, adaptive weight times the GAN loss) plus the commitment
beta * |z_e - sg(z_q)|^2; the decoder gets z_e + sg(z_q - z_e) (the straight-through estimator).

Beyond the seed: dead codes (EMA cluster size below `vq.dead_code_threshold`) restart from random
encodings of the current batch (Jukebox, Dhariwal et al. 2020; vector-quantize-pytorch's
threshold_ema_dead_code), drawn from the trainer's generator, so a resumed run draws the same; the
statistics are summed over processes under DDP. Logged: perplexity of the batch's code histogram
(taming), the share of codes used in the last `vq.usage_window` steps, and the codes restarted.

The network is RANDOM at the start: a VQModel with the base VAE's shapes (block types and
channels, layers, latent channels, norm groups), seeded by the run's seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.models.autoencoder.adapter import AutoencoderAdapter, evaluation_forward
from tuneline.models.autoencoder.config import AutoencoderConfig, VQConfig
from tuneline.models.config import ModelConfig
from tuneline.models.loading import vae_source

# The base VAE's config keys a VQModel takes the same way: its shapes, not its weights.
_SHAPE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
               "mid_block_add_attention")
CODEBOOK = "vae.quantize.embedding.weight"  # the codebook in state_tensors: the VQModel's own key, under "vae."


def vq_network_config(vae_config: dict[str, Any], vq: VQConfig) -> dict[str, Any]:
    """The VQModel config with the shapes of an AutoencoderKL config and the codebook of `vq`."""
    shapes = {key: vae_config[key] for key in _SHAPE_KEYS if key in vae_config}
    return {**shapes, "num_vq_embeddings": vq.codebook_size, "vq_embed_dim": vq.embedding_dim}


def random_vq_model(config: dict[str, Any], seed: int) -> Any:
    """A VQModel of `config` with random weights drawn from `seed` (the global RNG is left as it was)."""
    import torch
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(**config)


def quantize(z_e: Any, codebook: Any) -> tuple[Any, Any, Any]:
    """(z_q as z_e's shape, code index per encoding, the encodings flattened (B*H*W, D)): the nearest code
    of each encoding, computed as diffusers' VectorQuantizer does (so VQModel.decode picks the same codes)."""
    import torch

    z = z_e.permute(0, 2, 3, 1).contiguous()
    flat = z.view(-1, codebook.shape[1])
    indices = torch.argmin(torch.cdist(flat, codebook), dim=1)
    z_q = codebook[indices].view(z.shape).permute(0, 3, 1, 2).contiguous()
    return z_q, indices, flat


def perplexity(counts: Any) -> Any:
    """exp of the entropy of the code histogram (taming's perplexity): 1 when one code takes every encoding."""
    import torch

    probabilities = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.sum(probabilities * torch.log(probabilities + 1e-10)))


def ema_update(codebook: Any, cluster_size: Any, embed_avg: Any, counts: Any, sums: Any, decay: float,
               epsilon: float) -> None:
    """taming's EmbeddingEMA update in place: cluster sizes and embedding sums decayed toward this batch's
    `counts` (K,) and `sums` (K, D), the codebook set to the sums over the Laplace-smoothed sizes."""
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + epsilon) / (n + codebook.shape[0] * epsilon) * n
    codebook.copy_(embed_avg / smoothed.unsqueeze(1))


def restart_dead_codes(codebook: Any, cluster_size: Any, embed_avg: Any, flat: Any, threshold: float,
                       generator: Any) -> Any:
    """Codes whose EMA cluster size is below `threshold` become random encodings of `flat` (one draw per
    code, dead or not, so the stream advances alike whatever died); their cluster size is set to
    `threshold` and their sum to the encoding times it (so sum / size is the encoding). Returns the mask."""
    import torch

    dead = cluster_size < threshold
    picks = flat[torch.randint(0, flat.shape[0], (codebook.shape[0],), generator=generator,
                               device=generator.device).to(flat.device)]
    codebook.copy_(torch.where(dead[:, None], picks, codebook))
    embed_avg.copy_(torch.where(dead[:, None], picks * threshold, embed_avg))
    cluster_size.copy_(torch.where(dead, torch.full_like(cluster_size, threshold), cluster_size))
    return dead


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EmaCodebook:
    """The EMA statistics of the VQModel's codebook (cluster sizes N, embedding sums m, the step each code
    was last used at) and their update. The codebook itself stays the VQModel's parameter."""

    def __init__(self, codebook: Any, config: VQConfig, device: Any = None) -> None:
        import torch

        self.config = config
        device = codebook.device if device is None else device
        size = codebook.shape[0]
        self.cluster_size = torch.zeros(size, dtype=torch.float32, device=device)
        self.embed_avg = codebook.detach().to(device, torch.float32, copy=True)
        self.last_used = torch.zeros(size, dtype=torch.int64, device=device)  # 0: never (steps count from 1)

    def tensors(self) -> dict[str, Any]:
        return {"codebook_ema.cluster_size": self.cluster_size, "codebook_ema.embed_avg": self.embed_avg,
                "codebook_ema.last_used": self.last_used}

    def update(self, codebook: Any, flat: Any, indices: Any, step: int, generator: Any) -> dict[str, Any]:
        """One training forward's update at optimizer step `step` (1-based) from its encodings `flat` and their
        codes `indices`; returns the logged numbers (device tensors)."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        config = self.config
        with torch.no_grad():
            flat = flat.detach().float()
            # One-hot products, as taming: deterministic on GPUs (index_add_ is not).
            onehot = F.one_hot(indices, codebook.shape[0]).float()
            counts, sums = onehot.sum(0), onehot.t() @ flat
            distributed = _distributed()
            if distributed:  # every process keeps the same codebook
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            ema_update(codebook, self.cluster_size, self.embed_avg, counts, sums, config.decay, config.epsilon)
            self.last_used.copy_(torch.where(counts > 0, torch.full_like(self.last_used, step), self.last_used))
            restarted = torch.zeros((), device=flat.device)
            if config.dead_code_threshold > 0:
                dead = restart_dead_codes(codebook, self.cluster_size, self.embed_avg, flat,
                                          config.dead_code_threshold, generator)
                if distributed:  # the draws are of each process's own batch: the first process's count
                    for tensor in (codebook, self.embed_avg, self.cluster_size):
                        dist.broadcast(tensor, 0)
                restarted = dead.sum().float()
            window = (self.last_used > 0) & (self.last_used > step - config.usage_window)
        return {"perplexity": perplexity(counts), "codebook_usage": window.float().mean(),
                "codes_restarted": restarted}


class VQAdapter(AutoencoderAdapter):
    """A VQModel (RANDOM at the start, the base VAE's shapes) with an EMA codebook, and its discriminator."""

    family = "autoencoder_vq"

    def __init__(self, model_config: ModelConfig, config: AutoencoderConfig, root: Path) -> None:
        super().__init__(model_config, config, root)
        self.codebook_ema: EmaCodebook | None = None
        self.last_codes: dict[str, Any] = {}  # the last forward's encodings and codes (for tests)

    def network_config(self) -> dict[str, Any]:
        """The VQModel's config: the shapes of the base VAE (model.vae, else model.base's vae/; its config only)."""
        from diffusers import AutoencoderKL

        source = vae_source(self.model_config, self.root)
        return vq_network_config(dict(AutoencoderKL.load_config(source.location, **source.load_kwargs())),
                                 self.config.vq)

    def build_network(self) -> Any:
        """A RANDOM VQModel drawn from the seed the trainer seeded torch with (reference_network rebuilds it)."""
        import torch

        return random_vq_model(self.network_config(), torch.initial_seed())

    def freeze(self, network: Any) -> None:
        network.quantize.requires_grad_(False)  # the codebook follows the EMA, never the optimizer

    def setup_training(self, device: Any = None) -> None:
        super().setup_training(device)
        self.codebook_ema = EmaCodebook(self.vae.quantize.embedding.weight, self.config.vq, device)

    def autoencode(self, inner: Any, x: Any, generator: Any, step: int) -> tuple[Any, Any, dict[str, Any]]:
        """z_e quantized to its nearest codes (the EMA update in training mode), decoded through the
        straight-through estimator; the regularizer is beta times the commitment loss."""
        import torch

        latents = inner.encode(x).latents
        codebook = inner.quantize.embedding.weight
        with torch.autocast(x.device.type, enabled=False):  # distances and the EMA in fp32
            z_e = latents.float()
            z_q, indices, flat = quantize(z_e, codebook.float())
            commitment = torch.mean((z_e - z_q.detach()) ** 2)
            terms: dict[str, Any] = {"commitment": commitment.detach()}
            if inner.training:
                terms.update(self.codebook_ema.update(codebook, flat, indices, step + 1, generator))
            self.last_codes = {"z_e": z_e.detach(), "indices": indices}
            straight_through = z_e + (z_q - z_e).detach()
        reconstruction = inner.decode(straight_through.to(latents.dtype), force_not_quantize=True).sample
        return reconstruction, self.config.vq.beta * commitment, terms

    def state_tensors(self, modules: dict[str, Any]) -> dict[str, Any]:
        """The codebook and its EMA statistics: changed by every step, in no optimizer."""
        vae = modules["vae"]
        inner = getattr(vae, "module", vae)
        return {CODEBOOK: inner.quantize.embedding.weight, **self.codebook_ema.tensors()}

    def reconstruct(self, network: Any, pixels: Any) -> Any:
        """The VQModel's reconstruction (nearest codes, decoded) of a batch in [-1, 1], on the CPU."""
        return evaluation_forward(network, pixels, lambda x: network.decode(network.encode(x).latents).sample)

    def reference_network(self, seed: int) -> Any:
        """What training started from: the RANDOM VQModel of the run's seed (there is no base VQ model)."""
        return random_vq_model(self.network_config(), seed).eval()

    def load_output(self, folder: Path) -> Any:
        from diffusers import VQModel

        return VQModel.from_pretrained(folder)
