"""The demo's U-Net: 8 -> 128 filters, one output per class, logits out (no sigmoid or softmax)."""
import keras

FILTERS = (8, 16, 32, 64)
BOTTLENECK = 128


def _conv_block(x, filters):
    for _ in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                kernel_initializer="he_normal")(x)
    return x


def build_unet(size, classes, channels=3):
    """Encoder 8-16-32-64, bottleneck 128, mirrored decoder; the last 1x1 conv gives logits.

    The sigmoid or softmax is inside the loss (and the metrics take logits), so the model
    never computes probabilities itself.
    """
    inputs = keras.Input((size, size, channels))
    x, skips = inputs, []
    for filters in FILTERS:
        x = _conv_block(x, filters)
        skips.append(x)
        x = keras.layers.MaxPooling2D()(x)
    x = _conv_block(x, BOTTLENECK)
    for filters, skip in zip(reversed(FILTERS), reversed(skips)):
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = _conv_block(keras.layers.Concatenate()([x, skip]), filters)
    logits = keras.layers.Conv2D(classes, 1, name="logits")(x)
    return keras.Model(inputs, logits, name="unet")
