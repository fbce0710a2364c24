"""The training loss of §3.4: L = L_dice + 0.1 * L_L2 + 0.1 * L_KL.

Every function returns one value PER EXAMPLE (shape [B]); the caller reduces
(for tf.distribute: sum over the replica's examples divided by the GLOBAL
batch size, see ``reduce_per_example``). All arithmetic is float32 whatever
the inputs' dtype (mixed precision), with no Python branching on tensor
values, and no NaN for empty masks or all-zero predictions.
"""

from __future__ import annotations

import tensorflow as tf

from brats_tf.config import LossConfig

_SPATIAL = (1, 2, 3)


def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def soft_dice_loss(y_true, y_pred, epsilon: float = 1e-5) -> tf.Tensor:
    """Soft Dice loss with squared denominator, summed over channels (§3.4).

    Per example and channel c:
        1 - 2 * sum(t_c * p_c) / (sum(t_c^2) + sum(p_c^2) + epsilon),
    sums over all voxels; the channels' losses are added (3 for WT, TC, ET,
    so the loss lies in [0, 3]). An empty mask with an all-zero prediction
    gives 1 for that channel (the paper's formula; finite, no NaN).

    Args:
      y_true: [B, D, H, W, C] targets in [0, 1].
      y_pred: [B, D, H, W, C] probabilities (sigmoid outputs, not logits).
    Returns: [B] float32.
    """
    y_true, y_pred = _f32(y_true), _f32(y_pred)
    numerator = 2.0 * tf.reduce_sum(y_true * y_pred, axis=_SPATIAL)
    denominator = (
        tf.reduce_sum(tf.square(y_true), axis=_SPATIAL)
        + tf.reduce_sum(tf.square(y_pred), axis=_SPATIAL)
        + epsilon
    )
    return tf.reduce_sum(1.0 - numerator / denominator, axis=-1)


def l2_loss(image, recon) -> tf.Tensor:
    """VAE reconstruction loss L_L2 (§3.4): MEAN squared error over voxels and channels.

    The paper writes ||I_input - I_pred||_2^2; a sum over the 4 x 160 x 192 x 128
    voxels would be ~1.6e7 times larger and swamp the Dice term at weight 0.1,
    so implementations (and this one) use the mean (docs/deviations.md).

    Args:
      image: [B, D, H, W, C] the (normalised) network input.
      recon: [B, D, H, W, C] the VAE output.
    Returns: [B] float32.
    """
    return tf.reduce_mean(tf.square(_f32(image) - _f32(recon)), axis=(1, 2, 3, 4))


def kl_loss(z_mean, z_log_var, num_voxels) -> tf.Tensor:
    """KL term of §3.4: (1/N) * sum(mean^2 + std^2 - log(std^2) - 1).

    With std^2 = exp(z_log_var). The sum runs over the latent dimensions and N
    is the number of image voxels (D * H * W of the input), as in the paper.
    (No factor 1/2: the paper's formula is used as printed.)

    Args:
      z_mean, z_log_var: [B, latent].
      num_voxels: N, a Python number or scalar tensor.
    Returns: [B] float32.
    """
    z_mean, z_log_var = _f32(z_mean), _f32(z_log_var)
    total = tf.reduce_sum(tf.square(z_mean) + tf.exp(z_log_var) - z_log_var - 1.0, axis=-1)
    return total / _f32(num_voxels)


def total_loss(labels, image, outputs: dict, config: LossConfig | None = None) -> dict:
    """L = dice_weight * L_dice + l2_weight * L_L2 + kl_weight * L_KL, per example.

    Args:
      labels: [B, D, H, W, 3] WT/TC/ET targets.
      image: [B, D, H, W, 4] the network input (the VAE's target).
      outputs: the training model's output dict (``seg`` and, with the VAE,
        ``recon``, ``z_mean``, ``z_log_var``). Without the VAE keys only the
        Dice term is used (ablation).
      config: the weights; defaults to the paper's (1, 0.1, 0.1).
    Returns: {"loss", "dice", "l2", "kl"}, each [B] float32 (l2 and kl are
      zeros when the model has no VAE).
    """
    config = config or LossConfig()
    dice = soft_dice_loss(labels, outputs["seg"], config.dice_epsilon)
    if "recon" in outputs:
        l2 = l2_loss(image, outputs["recon"])
        num_voxels = tf.reduce_prod(tf.shape(image)[1:4])
        kl = kl_loss(outputs["z_mean"], outputs["z_log_var"], num_voxels)
    else:
        l2 = tf.zeros_like(dice)
        kl = tf.zeros_like(dice)
    loss = config.dice_weight * dice + config.l2_weight * l2 + config.kl_weight * kl
    return {"loss": loss, "dice": dice, "l2": l2, "kl": kl}


def reduce_per_example(values, global_batch_size) -> tf.Tensor:
    """Sum of per-example values over the GLOBAL batch size.

    Under tf.distribute each replica sees its share of the batch; dividing by
    the global (not the per-replica) batch makes the replicas' gradients sum
    to the gradient of the batch mean. With one replica it is the mean.
    """
    return tf.reduce_sum(_f32(values)) / _f32(global_batch_size)
