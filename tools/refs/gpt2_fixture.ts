// Implements: the inputs of the GPT-2 cross-check — a tiny Flotilla GPT exported the
// Hugging Face way (test/fixtures/gpt2-tiny.safetensors + gpt2-tiny.config.json), with the
// token ids to run stored in the safetensors metadata ("flotilla_tokens", JSON [B][T]).
// Owns: the fixture model's config, seed, perturbation and tokens. Does not own: the
// reference forward (tools/refs/gpt2_ref.py, which writes gpt2-tiny.logits.json), the
// format (shared/checkpoint/safetensors.ts) or the names (shared/models/hf-gpt2.ts).
//
// Regenerate all three fixtures:
//   export PATH=/work/main/.tools/node_modules/.bin:$PATH
//   node tools/refs/gpt2_fixture.ts
//   /usr/bin/python3 tools/refs/gpt2_ref.py
// Checked by test/safetensors.test.ts.

import { writeFileSync } from "node:fs"
import { encodeSafetensors } from "../../shared/checkpoint/safetensors.ts"
import type { GptConfig } from "../../shared/models/gpt.ts"
import { makeGpt } from "../../shared/models/gpt.ts"
import { HF_GPT2_METADATA, hfGpt2Config, toHfGpt2 } from "../../shared/models/hf-gpt2.ts"
import { Rng } from "../../shared/models/rng.ts"

const CONFIG: GptConfig = { vocabSize: 64, contextLength: 16, layers: 2, heads: 2, width: 16, dropout: 0 }
const SEED = 7
const B = 2
const T = 12 // < contextLength: the reference must slice wpe like HF does

const def = makeGpt(CONFIG)
const params = def.init(SEED)
// GPT-2 init leaves biases 0 and LayerNorm gains 1, which would hide a bias or gain read
// from the wrong place, and its 0.02 weights make attention nearly uniform. Perturb every
// tensor so that each one matters: weights N(0, 0.3) on top, biases and gains ±N(0, 0.2).
const rng = new Rng(SEED + 1000)
for (const [name, v] of params) {
  const std = name.endsWith(".bias") || /ln_\w+\.weight$/.test(name) ? 0.2 : 0.3
  for (let i = 0; i < v.length; i++) v[i] += rng.normal() * std
}
const tokens = Array.from({ length: B }, () => Array.from({ length: T }, () => rng.int(CONFIG.vocabSize)))

const fixtures = new URL("../../test/fixtures/", import.meta.url)
const bytes = encodeSafetensors(toHfGpt2(params, CONFIG), { ...HF_GPT2_METADATA, flotilla_tokens: JSON.stringify(tokens) })
writeFileSync(new URL("gpt2-tiny.safetensors", fixtures), bytes)
writeFileSync(new URL("gpt2-tiny.config.json", fixtures), JSON.stringify(hfGpt2Config(CONFIG), null, 2) + "\n")
console.log(`wrote gpt2-tiny.safetensors (${bytes.length} bytes) and gpt2-tiny.config.json; tokens ${JSON.stringify(tokens)}`)
