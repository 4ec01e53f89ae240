"""Models nobody here wrote (torchvision, timm, Hugging Face), random weights, tiny sizes: steps are
optimizer steps, channel counts are the layers' declared sizes, and no selected layer stays silent."""

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
import transformers
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import covshift
from covshift.faults import CovshiftWarning
from covshift.record.layers import declared_channels


def train_steps(model, make_batch, loss_of, updates=3, accumulate=2):
    """``updates`` optimizer steps of ``accumulate`` micro-batches each, covshift attached to the optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tracker = covshift.attach(model, optimizer=opt, every=1)
        for _ in range(updates):
            for _ in range(accumulate):
                loss_of(model, make_batch()).backward()
            opt.step()
            opt.zero_grad()
        run = tracker.detach()
    return tracker, run, [str(w.message) for w in record if issubclass(w.category, CovshiftWarning)]


def check(tracker, run, messages, updates=3):
    stats = run.stats("train")
    assert sorted(stats.step.unique()) == list(range(updates))
    layers = run.layers.set_index("layer")
    assert set(layers.index) == set(tracker.layers) - set(tracker.duplicates), \
        "every selected layer is recorded, but blocks whose input is their first submodule's"
    for name, module in tracker.layers.items():
        declared = declared_channels(module)
        if declared is not None:
            assert layers.loc[name, "channels"] == declared, name
    assert messages == []


def images(size=32, batch=2, channels=3):
    return lambda: torch.randn(batch, channels, size, size)


def classify(model, x):
    out = model(x)
    return F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long))


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.resnet18(num_classes=4),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=4),
        lambda: torchvision.models.efficientnet_b0(num_classes=4),
        lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=4),
        lambda: torchvision.models.VisionTransformer(32, 16, 2, 2, 32, 64, num_classes=4),
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=4),
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=4),
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=4),
    ],
    ids=["resnet18", "mobilenet_v3", "efficientnet", "convnext", "vit", "timm_resnet18", "timm_convnext",
         "timm_vit"],
)
def test_image_classifiers(build):
    torch.manual_seed(0)
    check(*train_steps(build(), images(), classify))


def test_convnext_layernorm2d_is_summarized_along_channels():
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=4)
    tracker, run, _ = train_steps(model, images(), classify, updates=1, accumulate=1)
    layers = run.layers.set_index("layer")
    norms = [name for name, module in tracker.layers.items() if type(module).__name__ == "LayerNorm2d"]
    assert norms and all(layers.loc[name, "channel_dim"] == 1 for name in norms)
    assert [layers.loc[name, "channels"] for name in norms] == [16, 16, 32]


def test_segmentation_model():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=False
    )

    def loss_of(model, x):
        return F.cross_entropy(model(x)["out"], torch.zeros(x.shape[0], 64, 64, dtype=torch.long))

    check(*train_steps(model, images(64), loss_of, updates=2, accumulate=1), updates=2)


def test_detection_model_with_a_probe_function():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64
    )
    fixed = [torch.rand(3, 64, 64) for _ in range(4)]
    boxes = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])} for _ in range(4)]

    def loss_of(model, batch):
        return sum(model(*batch).values())

    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    tracker = covshift.attach(model, "backbone.body.*", optimizer=opt, every=1)
    tracker.probe(lambda half: model(fixed[half * 2 : half * 2 + 2], boxes[half * 2 : half * 2 + 2]), every=1)
    for _ in range(2):
        loss_of(model, (fixed[:2], boxes[:2])).backward()
        opt.step()
        opt.zero_grad()
    stats = tracker.detach().stats()
    assert sorted(stats[stats.source == "train"].step.unique()) == [0, 1]
    assert sorted(stats[stats.source == "probe"].step.unique()) == [0, 1, 2]  # step 2 opens at the last update
    assert {"train", "probe", "probe_a", "probe_b"} <= set(stats.source)


def tokens(vocab=50, batch=2, length=6):
    return lambda: torch.randint(0, vocab, (batch, length))


def test_bert_keyword_inputs():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)

    def loss_of(model, ids):
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.zeros(ids.shape[0], dtype=torch.long)).loss

    check(*train_steps(model, tokens(), loss_of))


def test_gpt2_with_a_keyword_probe():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)

    def loss_of(model, ids):
        return model(input_ids=ids, labels=ids).loss

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    tracker = covshift.attach(model, optimizer=opt, every=1)
    tracker.probe(input_ids=torch.randint(0, 50, (4, 6)), every=1)
    for _ in range(2):
        loss_of(model, tokens()()).backward()
        opt.step()
    stats = tracker.detach().stats()
    probe = stats[(stats.source == "probe") & (stats.channel == 0) & (stats.layer == "lm_head")]
    assert sorted(probe.step) == [0, 1, 2] and (probe["count"] == 24).all()  # step 2 opens at the last update
    assert "transformer.wte" not in tracker.layers  # token embeddings take indices


def test_from_pretrained_style_eval_model_warns():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    )
    model = transformers.BertModel(config).eval()  # as from_pretrained() returns it
    with pytest.warns(CovshiftWarning, match=r"model.train\(\)"):
        with covshift.attach(model):
            model(input_ids=tokens()())


# -- the channel axis of blocks that declare no channel count (one forward each) --------------------
SCANNED = {
    "torchvision_convnext": lambda: ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=4),
    "convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=4),
    "poolformer_s12": lambda: timm.create_model("poolformer_s12", pretrained=False, num_classes=4),
    "inception_next_atto": lambda: timm.create_model("inception_next_atto", pretrained=False, num_classes=4),
    "fastvit_t8": lambda: timm.create_model("fastvit_t8", pretrained=False, num_classes=4),
    "convformer_s18": lambda: timm.create_model("convformer_s18", pretrained=False, num_classes=4),
    "edgenext_xx_small": lambda: timm.create_model("edgenext_xx_small", pretrained=False, num_classes=4),
}
#: The blocks of issue 28 that were summarized along the image width.
PER_CHANNEL_BLOCKS = {"CNBlock", "ConvNeXtBlock", "Scale", "MetaNeXtBlock", "LayerScale2d", "ConvBlock"}


def expected_channels(module, shape):
    """What the module says its input's channel count is: the count it declares, else the size of
    its per-channel parameters (every parameter of its own one-dimensional but for size-1 axes, all
    of one size) when one axis of the input (the batch axis aside) has that size."""
    declared = declared_channels(module)
    if declared is not None:
        return declared
    sizes = set()
    for parameter in module.parameters(recurse=False):
        kept = [size for size in parameter.shape if size != 1]
        if len(kept) != 1:
            return None
        sizes.add(kept[0])
    if len(sizes) == 1 and next(iter(sizes)) in shape[1:]:
        return sizes.pop()
    return None


@pytest.mark.parametrize("family", list(SCANNED))
def test_every_recorded_layer_has_the_channel_count_it_says_or_is_named_in_a_warning(family):
    torch.manual_seed(0)
    model = SCANNED[family]().train()
    shapes = {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tracker = covshift.attach(model, every=1)
        handles = [
            module.register_forward_pre_hook(lambda mod, args, name=name: shapes.setdefault(name, args[0].shape) and None)
            for name, module in tracker.layers.items()
        ]
        model(torch.randn(2, 3, 64, 64))
        run = tracker.detach()
    for handle in handles:
        handle.remove()
    warned = "\n".join(str(w.message) for w in record if issubclass(w.category, CovshiftWarning))
    layers = run.layers.set_index("layer")
    blocks = 0
    for name, row in layers.iterrows():
        module = tracker.layers[name]
        expected = expected_channels(module, shapes[name])
        blocks += type(module).__name__ in PER_CHANNEL_BLOCKS
        if expected is not None and row["channels"] != expected:
            assert repr(name) in warned, f"{name} ({type(module).__name__}, input {tuple(shapes[name])}): " \
                                         f"{row['channels']} channels along dim {row['channel_dim']}, {expected} expected"
    unrecorded = set(tracker.layers) - set(layers.index)
    assert unrecorded == set(tracker.duplicates), "a selected layer is recorded unless it repeats a submodule's input"
    assert all(tracker.duplicates[name].startswith(f"{name}.") for name in tracker.duplicates)
    assert blocks or tracker.duplicates, "the family's per-channel blocks are recorded or named as duplicates"
