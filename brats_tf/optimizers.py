"""Adam (§3.5) with TensorFlow's fused update kernel.

Keras 3's Adam writes its update as ~39 graph ops per variable (casts, two
powers, the moment updates, the step); the paper's network has 154
variables, so the optimizer alone was 6,000 of a train step's 16,500 graph
ops. Tracing and optimising that graph took half of the ~27 s a Trainer
needs before its first step (16^3, width 8, 2-core CPU), and the step
itself went from 0.155 to 0.14 s with this class. ``ResourceApplyAdam`` performs the same update as one kernel
per variable:

    lr_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    m += (g - m) * (1 - beta_1);  v += (g^2 - v) * (1 - beta_2)
    w -= lr_t * m / (sqrt(v) + epsilon)

which is Keras's formula term by term (keras/src/optimizers/adam.py), so
the two agree to float rounding (tests/test_optimizers.py checks both
against a NumPy Adam). The slots, their names and the checkpoint layout
are Keras's: checkpoints of either class restore into the other.
"""

from __future__ import annotations

import keras
import tensorflow as tf

def _tf_variable(variable):
    """The tf.Variable (or distributed variable) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


@keras.saving.register_keras_serializable(package="brats_tf")
class Adam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose per-variable update is one fused kernel.

    Same arguments and configuration as Keras's Adam. AMSGrad, non-float32
    variables and sparse (IndexedSlices) gradients take Keras's update.
    """

    _scalars = None  # this step's (lr, beta1_power, beta2_power, beta_1, beta_2, epsilon)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # Called once a step (in cross-replica context under a strategy)
        # before the per-variable updates: their shared scalars, once.
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.cast(self.beta_1, tf.float32)
        beta_2 = tf.cast(self.beta_2, tf.float32)
        self._scalars = (tf.cast(learning_rate, tf.float32), tf.pow(beta_1, step),
                         tf.pow(beta_2, step), beta_1, beta_2, tf.cast(self.epsilon, tf.float32))
        try:
            return super()._distributed_tf_update_step(distribution, grads_and_vars,
                                                       learning_rate)
        finally:
            self._scalars = None

    def update_step(self, gradient, variable, learning_rate):
        if (self._scalars is None or self.amsgrad or isinstance(gradient, tf.IndexedSlices)
                or variable.dtype != tf.float32):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m = _tf_variable(self._momentums[index])
        v = _tf_variable(self._velocities[index])
        lr, beta1_power, beta2_power, beta_1, beta_2, epsilon = self._scalars
        # In an update() call of a distribution strategy, ``handle`` is the
        # handle of this device's copy.
        tf.raw_ops.ResourceApplyAdam(
            var=_tf_variable(variable).handle, m=m.handle, v=v.handle,
            beta1_power=beta1_power, beta2_power=beta2_power,
            lr=lr, beta1=beta_1, beta2=beta_2,
            epsilon=epsilon, grad=tf.cast(gradient, tf.float32), use_locking=False)
