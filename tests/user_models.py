"""Three models a user might bring, written with plain Flax NNX: no moai_jax import anywhere here."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

VOCAB, WIDTH, HIDDEN, HEADS, FEATURES, CLASSES = 256, 64, 256, 4, 32, 10


class MLPLM(nnx.Module):
    """Each position's next token from its own and the previous token's embeddings."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, width: int = WIDTH, hidden: int = HIDDEN):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.up = nnx.Linear(2 * width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, input_ids):
        x = self.embed(input_ids)
        previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        h = self.down(jax.nn.gelu(self.up(jnp.concatenate([x, previous], axis=-1))))
        return self.head(x + h)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, layers: int = 2, max_len: int = 64):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, WIDTH)))
        self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, input_ids):
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.positions[:length]
        mask = nnx.make_causal_mask(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


# Partition rules a user of the transformer writes for tensor parallelism (EasyDeL / t5x style)
TRANSFORMER_RULES = [
    (r"attn/(query|key|value)/kernel", ("embed", "heads", "head_dim")),
    (r"attn/(query|key|value)/bias", ("heads", "head_dim")),
    (r"attn/out/kernel", ("heads", "head_dim", "embed")),
    (r"up/kernel", ("embed", "mlp")),
    (r"up/bias", ("mlp",)),
    (r"down/kernel", ("mlp", "embed")),
    (r"embed/embedding", ("vocab", "embed")),
]


class Classifier(nnx.Module):
    """Not a language model: float features in, class scores out."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
        self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.hidden(x))))


def classifier_loss(model, batch):
    """Summed weighted cross-entropy and the weight it sums over."""
    logits = model(batch["features"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(losses * batch["weight"]), jnp.sum(batch["weight"])
