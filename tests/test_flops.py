"""brats_tf.flops on hand-countable models."""

import keras

from brats_tf import flops
from brats_tf.config import ModelConfig
from brats_tf.layers import ResNetBlock
from brats_tf.model import build_model


def test_conv_dense_and_block_by_hand():
    inp = keras.Input((4, 4, 2, 3))
    x = keras.layers.Conv3D(8, 3, padding="same")(inp)  # 32 voxels x 8 x (2*27*3 + 1)
    x = ResNetBlock(8, groups=4)(x)  # 2 x 32 x 8 x (2*27*8 + 1)
    x = keras.layers.Conv3D(2, 1, strides=2)(x)  # 4 voxels x 2 x (2*8 + 1)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5)(x)  # 5 x (2*8 + 1)
    model = keras.Model(inp, x)
    want = 32 * 8 * 163 + 2 * 32 * 8 * 433 + 4 * 2 * 17 + 5 * 17
    assert flops.forward_flops(model) == want
    assert flops.train_step_flops(model, batch_size=2) == 6 * want


def test_paper_model_flops_order_of_magnitude():
    # InitConv alone: 160*192*128 voxels x 32 x (2*27*4 + 1) = 852 MFLOP.
    model = build_model(ModelConfig())
    f = flops.forward_flops(model)
    init = 160 * 192 * 128 * 32 * (2 * 27 * 4 + 1)
    assert f > 100 * init  # the 3x3x3 convs at full resolution dominate
    block0 = 2 * 160 * 192 * 128 * 32 * (2 * 27 * 32 + 1)
    assert f > 5 * block0  # EncoderBlock0, DecoderBlock0, VBlock0, ...
