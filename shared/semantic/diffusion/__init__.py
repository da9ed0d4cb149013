"""The semantic diffusion model: the U-Net (`unet`), the Gaussian diffusion process
(`gaussian_diffusion`), the sampler registry (`samplers`), int8 quantisation (`quantization`) and
`generator`, which loads a checkpoint and makes images from maps with a `SamplingOptions`."""
