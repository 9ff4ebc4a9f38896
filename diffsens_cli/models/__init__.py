"""Score networks (diffusers' UNet2DModel, a Fourier MLP) and their saved form.

The kinds of ``model.kind`` are listed here, in a module that imports nothing, so that
checking a config does not import diffusers."""

NETWORK_KINDS = ("unet", "mlp", "pretrained")  # built by models.unet.build_network_model
VECTOR_KINDS = ("closed_form", "mlp", "pretrained")  # score models of the synthetic (vector) tasks
