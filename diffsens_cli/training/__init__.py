"""Training score networks by denoising score matching: the loss, what a batch is drawn
from, and the resumable training loop."""
