// The example workflows (example_workflows/*.json) as compact specs. browser_test.mjs
// ("build" mode) turns them into real frontend workflows in a live ComfyUI, so widget order
// and links are exactly what the frontend writes. Regenerate after changing a node's inputs:
//   python tests/browser/run_browser_test.py --build-workflows
//
// A node: {id, type, at: [column, row], widgets: {name: value}, inputs: {input: [node id, output slot]}}.
// `control_after_generate: "fixed"` keeps the seed, so a re-queued example is reproducible.

const CKPT = "v1-5-pruned-emaonly-fp16.safetensors";
const LORA = "your_sd15_lora.safetensors";
const LCM_LORA = "lcm-lora-sdv1-5.safetensors";
const POSITIVE = "a lighthouse on a cliff at sunset, dramatic sky, detailed, photograph";
const NEGATIVE = "blurry, low quality, watermark";

// Checkpoint loader, prompts, latent, KSampler, decode and save around a chain of MODEL nodes.
function txt2img(chain, { steps = 20, cfg = 7.0, sampler = "euler", scheduler = "normal", lcm = false } = {}) {
  const col = chain.length + 1;
  let model = ["ckpt", 0];
  const nodes = [{ id: "ckpt", type: "CheckpointLoaderSimple", at: [0, 0], widgets: { ckpt_name: CKPT } }];
  chain.forEach((n, i) => {
    nodes.push({ ...n, at: [i + 1, 0], inputs: { model, ...(n.inputs ?? {}) } });
    model = [n.id, 0];
  });
  nodes.push(
    { id: "pos", type: "CLIPTextEncode", at: [1, 2], widgets: { text: POSITIVE }, inputs: { clip: ["ckpt", 1] } },
    { id: "neg", type: "CLIPTextEncode", at: [1, 3.3], widgets: { text: NEGATIVE }, inputs: { clip: ["ckpt", 1] } },
    { id: "latent", type: "EmptyLatentImage", at: [0, 2], widgets: { width: 512, height: 512, batch_size: 1 } },
    lcm ? {
      id: "sampler", type: "SDAccelLCMLoRASampler", at: [col, 0],
      widgets: { lcm_lora_name: LCM_LORA, strength: 1.0, seed: 42, control_after_generate: "fixed", steps: 4, cfg: 1.5, denoise: 1.0 },
      inputs: { model, positive: ["pos", 0], negative: ["neg", 0], latent_image: ["latent", 0] },
    } : {
      id: "sampler", type: "KSampler", at: [col, 0],
      widgets: { seed: 42, control_after_generate: "fixed", steps, cfg, sampler_name: sampler, scheduler, denoise: 1.0 },
      inputs: { model, positive: ["pos", 0], negative: ["neg", 0], latent_image: ["latent", 0] },
    },
    { id: "decode", type: "VAEDecode", at: [col + 1, 0], inputs: { samples: ["sampler", 0], vae: ["ckpt", 2] } },
    { id: "save", type: "SaveImage", at: [col + 1, 1], widgets: { filename_prefix: "sdaccel" }, inputs: { images: ["decode", 0] } },
  );
  return { nodes };
}

const cast = { id: "cast", type: "SDAccelFP16Cast", widgets: { dtype: "auto", channels_last: true, attention: "auto" } };
const compile = { id: "compile", type: "SDAccelCompileUNet", widgets: { backend: "auto", mode: "default", dynamic: false, fullgraph: false } };
const deepcache = { id: "deepcache", type: "SDAccelDeepCache", widgets: { cache_interval: 3, cache_depth: 0, schedule: "uniform" } };
const lora = { id: "lora", type: "SDAccelLoRAHotSwap", widgets: { lora_name: LORA, strength_model: 0.8 } };

export const SPECS = {
  "SDAccelCompileUNet": txt2img([compile]),
  "SDAccelFP16Cast": txt2img([cast]),
  "SDAccelDeepCache": txt2img([deepcache]),
  "SDAccelLoRAHotSwap": txt2img([compile, lora]),
  "SDAccelLCMLoRASampler": txt2img([cast], { lcm: true }),
  "SDAccel-stacked-cast-compile-deepcache-lora": txt2img([cast, compile, deepcache, lora]),
};
