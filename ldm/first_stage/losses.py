"""Training losses of the first stage: pixel + perceptual reconstruction, PatchGAN adversarial term with
the adaptive weight of Esser et al. 2021 (Eq. 7), codebook / KL terms, optional DiffAugment.

Module names (`discriminator.*`, `perceptual_loss.*`, `logvar`) match the anchors' checkpoints.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import NonNegativeFloat, NonNegativeInt, PositiveInt

DiscLoss = Literal["hinge", "vanilla"]
PixelLoss = Literal["l1", "l2"]


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# --- perceptual loss -------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) through the `lpips` package; needs torchvision's VGG16 weights."""

    def __init__(self):
        super().__init__()
        try:
            import lpips

            self.net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
        except Exception as e:  # no network, no cached weights, a proxy error: all end here
            raise RuntimeError(
                "the perceptual (LPIPS) loss needs the pretrained VGG16 weights, which torchvision downloads "
                f"on first use, and loading them failed ({type(e).__name__}: {e}). Connect to the internet once "
                "(or place vgg16-397923af.pth in the torch hub cache), or set "
                "`lossconfig.params.perceptual_weight: 0` to train without it."
            ) from e

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grayscale: the VGG features expect RGB
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        return self.net(x, y)  # (B, 1, 1, 1)


# --- discriminator ---------------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first batch (Kingma & Dhariwal 2018)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.initialized) == 0:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view_as(self.loc))
                self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
                self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) in taming-transformers' layout (`main.*`)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own bias
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=use_bias), norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=use_bias), norm(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before `threshold` steps, `weight` from then on (the discriminator's delayed start)."""
    return value if global_step < threshold else weight


# --- DiffAugment (Zhao et al. 2020) ----------------------------------------------------------------
def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (torch.rand(b, 1, 1, 1, device=x.device) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + dy + 1, 0, h + 1)
    gx = torch.clamp(gx[None] + dx + 1, 0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # zeros outside the image
    idx = (gy * (w + 2) + gx).view(b, 1, -1).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    inside = ((gy[None] - cy).abs() <= ch // 2) & ((gx[None] - cx).abs() <= cw // 2)
    return x * (~inside)[:, None].to(x.dtype)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Differentiable augmentation applied to every discriminator input (real and fake alike)."""
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name not in _AUGMENTS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; choose from {', '.join(_AUGMENTS)}")
        x = _AUGMENTS[name](x)
    return x


# --- the two first-stage losses --------------------------------------------------------------------
class _AdversarialLoss(nn.Module):
    """What the VQ and KL losses share: reconstruction term, discriminator, adaptive weight."""

    def __init__(self, disc_start: int, pixelloss_weight: float, disc_num_layers: int, disc_in_channels: int,
                 disc_factor: float, disc_weight: float, perceptual_weight: float, use_actnorm: bool,
                 disc_conditional: bool, disc_ndf: int, disc_loss: DiscLoss, pixel_loss: PixelLoss,
                 diffaug_policy: str | None):
        super().__init__()
        _check("disc_loss", disc_loss, ("hinge", "vanilla"))
        _check("pixel_loss", pixel_loss, ("l1", "l2"))
        if diffaug_policy:
            diff_augment(torch.zeros(1, 1, 4, 4), diffaug_policy)  # validate the policy now, not mid-training
        self.discriminator_iter_start = disc_start
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = LPIPS() if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.pixel_loss = pixel_loss
        self.disc_conditional = disc_conditional
        self.diffaug_policy = diffaug_policy

    def discriminator_active(self, global_step: int) -> bool:
        return adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start) > 0 and self.discriminator_weight > 0

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel pixel (+ perceptual) loss and the perceptual term alone."""
        rec = (x - xrec).abs() if self.pixel_loss == "l1" else (x - xrec).pow(2)
        rec = rec * self.pixel_weight
        p_loss = torch.zeros((), device=x.device)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(x.contiguous(), xrec.contiguous())
            rec = rec + self.perceptual_weight * p_loss
        return rec, p_loss.mean()

    def discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.diffaug_policy:
            x = diff_augment(x, self.diffaug_policy)
        if self.disc_conditional:
            if cond is None:
                raise ValueError("disc_conditional is set but no conditioning was given")
            x = torch.cat((x, cond), dim=1)
        return self.discriminator(x.contiguous())

    def adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """||grad nll|| / ||grad g|| at the decoder's last layer (Esser et al. 2021, Eq. 7), times disc_weight."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def generator_term(self, nll_loss: torch.Tensor, xrec: torch.Tensor, global_step: int,
                       last_layer: torch.Tensor | None, cond: torch.Tensor | None):
        """(weighted adversarial loss, g_loss, d_weight, disc_factor); zeros before disc_start."""
        zero = torch.zeros((), device=xrec.device)
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        if not self.discriminator_active(global_step):
            return zero, zero, zero, disc_factor
        g_loss = -self.discriminate(xrec, cond).mean()
        if self.training and last_layer is not None and torch.is_grad_enabled():
            d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
        else:
            d_weight = zero
        return d_weight * disc_factor * g_loss, g_loss, d_weight, disc_factor

    def discriminator_term(self, x: torch.Tensor, xrec: torch.Tensor, global_step: int, cond: torch.Tensor | None,
                           split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminate(x.detach(), cond)
        logits_fake = self.discriminate(xrec.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {f"{split}/disc_loss": d_loss.detach().clone(), f"{split}/logits_real": logits_real.detach().mean(),
                        f"{split}/logits_fake": logits_fake.detach().mean()}


class VQLPIPSWithDiscriminator(_AdversarialLoss):
    """VQGAN loss: L1/L2 (+ LPIPS) + codebook/commitment + adaptive-weighted PatchGAN term."""

    def __init__(self, disc_start: NonNegativeInt, codebook_weight: NonNegativeFloat = 1.0,
                 pixelloss_weight: NonNegativeFloat = 1.0, disc_num_layers: NonNegativeInt = 3,
                 disc_in_channels: PositiveInt = 3, disc_factor: NonNegativeFloat = 1.0,
                 disc_weight: NonNegativeFloat = 1.0, perceptual_weight: NonNegativeFloat = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_ndf: PositiveInt = 64,
                 disc_loss: DiscLoss = "hinge", pixel_loss: PixelLoss = "l1", diffaug_policy: str | None = None):
        super().__init__(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_ndf, disc_loss, pixel_loss, diffaug_policy)
        self.codebook_weight = codebook_weight

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train"):
        if optimizer_idx == 1:
            return self.discriminator_term(inputs, reconstructions, global_step, cond, split)
        rec, p_loss = self.reconstruction(inputs, reconstructions)
        nll_loss = rec.mean()
        adv, g_loss, d_weight, disc_factor = self.generator_term(nll_loss, reconstructions, global_step, last_layer, cond)
        loss = nll_loss + adv + self.codebook_weight * codebook_loss.mean()
        log = {f"{split}/total_loss": loss.detach().clone(), f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach(), f"{split}/rec_loss": rec.detach().mean(),
               f"{split}/p_loss": p_loss.detach(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor)), f"{split}/g_loss": g_loss.detach()}
        return loss, log


class LPIPSWithDiscriminator(_AdversarialLoss):
    """KL-autoencoder loss: Gaussian NLL with a learned scalar log-variance + KL + PatchGAN term."""

    def __init__(self, disc_start: NonNegativeInt, logvar_init: float = 0.0, kl_weight: NonNegativeFloat = 1.0,
                 pixelloss_weight: NonNegativeFloat = 1.0, disc_num_layers: NonNegativeInt = 3,
                 disc_in_channels: PositiveInt = 3, disc_factor: NonNegativeFloat = 1.0,
                 disc_weight: NonNegativeFloat = 1.0, perceptual_weight: NonNegativeFloat = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_ndf: PositiveInt = 64,
                 disc_loss: DiscLoss = "hinge", pixel_loss: PixelLoss = "l1", diffaug_policy: str | None = None):
        super().__init__(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_ndf, disc_loss, pixel_loss, diffaug_policy)
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init)

    def forward(self, posteriors, inputs: torch.Tensor, reconstructions: torch.Tensor, optimizer_idx: int,
                global_step: int, last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                split: str = "train"):
        if optimizer_idx == 1:
            return self.discriminator_term(inputs, reconstructions, global_step, cond, split)
        rec, p_loss = self.reconstruction(inputs, reconstructions)
        b = inputs.shape[0]
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / b
        kl_loss = posteriors.kl().sum() / b
        adv, g_loss, d_weight, disc_factor = self.generator_term(nll_loss, reconstructions, global_step, last_layer, cond)
        loss = nll_loss + self.kl_weight * kl_loss + adv
        log = {f"{split}/total_loss": loss.detach().clone(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach(), f"{split}/nll_loss": nll_loss.detach(),
               f"{split}/rec_loss": rec.detach().mean(), f"{split}/p_loss": p_loss.detach(),
               f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": torch.tensor(float(disc_factor)),
               f"{split}/g_loss": g_loss.detach()}
        return loss, log
