// Checks shared/checkpoint/safetensors.ts (the format: round trip, F16/BF16/F64 decoding
// against hand-made bytes, a specific SafetensorsError for every malformed input) and
// shared/models/hf-gpt2.ts (names both ways, bare names, buffers, the tied head, config.json
// both ways), then holds Flotilla's GPT against GPT-2 as Hugging Face computes it: the
// logits of test/fixtures/gpt2-tiny.* (made by tools/refs/gpt2_fixture.ts and
// tools/refs/gpt2_ref.py, real PyTorch) to 1e-4 of max|logit|, and shows that the
// comparison catches a transposed c_attn, swapped q/k, or a transposed c_proj.
// Run: npx vitest run test/safetensors.test.ts
import { readFileSync } from "node:fs"
import * as tf from "@tensorflow/tfjs"
import { beforeAll, describe, expect, it } from "vitest"
import { decodeSafetensors, encodeSafetensors, SafetensorsError } from "../shared/checkpoint/safetensors.ts"
import { initBackend } from "../shared/compute/backend.ts"
import type { GptConfig } from "../shared/models/gpt.ts"
import { gptLogits, gptTiny, makeGpt } from "../shared/models/gpt.ts"
import {
  fromHfGpt2,
  gptConfigFromHf,
  HF_GPT2_METADATA,
  HfGpt2Error,
  hfGpt2Config,
  isHfGpt2Buffer,
  toHfGpt2
} from "../shared/models/hf-gpt2.ts"
import { Rng } from "../shared/models/rng.ts"

beforeAll(async () => {
  expect((await initBackend("cpu")).name).toBe("cpu")
})

/** A safetensors file from a header given as text (so it can be malformed) and a buffer. */
const rawFile = (header: string, buffer: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array => {
  const json = new TextEncoder().encode(header)
  const out = new Uint8Array(8 + json.length + buffer.length)
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(json.length), true)
  out.set(json, 8)
  out.set(buffer, 8 + json.length)
  return out
}

/** Little-endian bytes of u16 words. */
const u16 = (...words: number[]): Uint8Array => {
  const b = new Uint8Array(2 * words.length)
  words.forEach((w, i) => new DataView(b.buffer).setUint16(2 * i, w, true))
  return b
}

const expectError = <E extends Error>(kind: new (...args: never[]) => E, f: () => unknown, message: RegExp): void => {
  let thrown: unknown
  try {
    f()
  } catch (e) {
    thrown = e
  }
  expect(thrown, "expected a throw").toBeInstanceOf(kind)
  expect((thrown as Error).message).toMatch(message)
}
const expectSafetensorsError = (f: () => unknown, message: RegExp): void => {
  expectError(SafetensorsError, f, message)
  try {
    f()
  } catch (e) {
    expect((e as SafetensorsError)._tag).toBe("SafetensorsError")
  }
}

describe("safetensors format", () => {
  const tensors = [
    { name: "b.weight", shape: [2, 3], data: new Float32Array([1, -2, 3.5, 1e-30, -0, 65504.5]) },
    { name: "0", shape: [], data: new Float32Array([Math.PI]) }, // integer-like name: order must survive
    { name: "empty", shape: [0, 4], data: new Float32Array(0) },
    { name: "ä/ünï", shape: [3], data: new Float32Array([Number.POSITIVE_INFINITY, Number.NaN, 7]) }
  ]

  it("round-trips names, order, shapes, values and metadata; header padded with spaces to 8", () => {
    const bytes = encodeSafetensors(tensors, { format: "pt", note: "héllo" })
    const N = Number(new DataView(bytes.buffer).getBigUint64(0, true))
    expect((8 + N) % 8).toBe(0)
    const header = new TextDecoder().decode(bytes.subarray(8, 8 + N))
    expect(header.trimEnd().endsWith("}")).toBe(true)
    expect(/^ *$/.test(header.slice(header.trimEnd().length))).toBe(true)
    const decoded = decodeSafetensors(bytes)
    expect([...decoded.tensors.keys()]).toEqual(tensors.map((t) => t.name))
    for (const t of tensors) {
      const d = decoded.tensors.get(t.name)!
      expect(d.dtype).toBe("F32")
      expect(d.shape).toEqual(t.shape)
      expect(Array.from(d.data)).toEqual(Array.from(t.data))
    }
    expect(decoded.metadata).toEqual({ format: "pt", note: "héllo" })
    expect(decodeSafetensors(encodeSafetensors([])).tensors.size).toBe(0)
  })

  it("copies: the result does not alias the input, and an unaligned input view works", () => {
    const bytes = encodeSafetensors(tensors)
    const shifted = new Uint8Array(bytes.length + 1).subarray(1) // byteOffset 1: not 4-aligned
    shifted.set(bytes)
    const decoded = decodeSafetensors(shifted)
    shifted.fill(0xff)
    expect(Array.from(decoded.tensors.get("b.weight")!.data)).toEqual(Array.from(tensors[0].data))
  })

  it("reads F16, BF16 and F64 as float32", () => {
    const f16 = u16(0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x03ff, 0x7c00, 0xfc00, 0x8000, 0x7e00)
    const bf16 = u16(0x3f80, 0xc020, 0x4049, 0x0000, 0xff80)
    const f64 = new Uint8Array(24)
    ;[Math.PI, -1e-3, 1e300].forEach((v, i) => new DataView(f64.buffer).setFloat64(8 * i, v, true))
    const header = JSON.stringify({
      h: { dtype: "F16", shape: [2, 5], data_offsets: [0, 20] },
      b: { dtype: "BF16", shape: [5], data_offsets: [20, 30] },
      d: { dtype: "F64", shape: [3], data_offsets: [30, 54] }
    })
    const buffer = new Uint8Array(54)
    buffer.set(f16, 0)
    buffer.set(bf16, 20)
    buffer.set(f64, 30)
    const { tensors: t } = decodeSafetensors(rawFile(header, buffer))
    expect(t.get("h")!.dtype).toBe("F16")
    expect(Array.from(t.get("h")!.data)).toEqual([1, -2, 0.5, 65504, 2 ** -24, 1023 * 2 ** -24, Infinity, -Infinity, -0, NaN])
    expect(Array.from(t.get("b")!.data)).toEqual([1, -2.5, 3.140625, 0, -Infinity])
    expect(Array.from(t.get("d")!.data)).toEqual([Math.fround(Math.PI), Math.fround(-1e-3), Infinity])
    expect(t.get("h")!.shape).toEqual([2, 5])
  })

  it("refuses integer and bool dtypes, naming the tensor and dtype, unless skipped", () => {
    const header = JSON.stringify({
      w: { dtype: "F32", shape: [1], data_offsets: [0, 4] },
      mask: { dtype: "I32", shape: [2], data_offsets: [4, 12] }
    })
    const file = rawFile(header, new Uint8Array(12))
    expectSafetensorsError(() => decodeSafetensors(file, "x.safetensors"), /^x\.safetensors: tensor "mask" has dtype I32/)
    for (const dtype of ["I8", "BOOL", "U8", "I64"]) {
      const n = dtype === "I64" ? 8 : 1
      const f = rawFile(JSON.stringify({ t: { dtype, shape: [1], data_offsets: [0, n] } }), new Uint8Array(n))
      expectSafetensorsError(() => decodeSafetensors(f), new RegExp(`tensor "t" has dtype ${dtype}`))
    }
    const skipped = decodeSafetensors(file, "x", { skip: (n) => n === "mask" })
    expect([...skipped.tensors.keys()]).toEqual(["w"])
  })

  it("gives a specific SafetensorsError for each malformed input", () => {
    const t = (info: object, extra: object = {}) => JSON.stringify({ t: info, ...extra })
    const ok = { dtype: "F32", shape: [2], data_offsets: [0, 8] }
    const buf8 = new Uint8Array(8)
    const cases: Array<[string, Uint8Array, RegExp]> = [
      ["empty", new Uint8Array(0), /too short: 0 bytes/],
      ["too short", new Uint8Array(5), /too short: 5 bytes/],
      ["header length past the end", rawFile(t(ok), buf8, 1000n), /header length 1000 runs past the end/],
      ["header length near 2^64", rawFile(t(ok), buf8, 2n ** 64n - 1n), /header length 18446744073709551615 runs past/],
      ["header not JSON", rawFile("{not json", buf8), /header is not JSON/],
      ["header zero length", rawFile("", buf8), /header is not JSON/],
      ["header an array", rawFile("[1,2]"), /header is not a JSON object/],
      ["header not UTF-8", rawFile("{}").map((b, i) => (i === 8 ? 0xff : b)), /not valid UTF-8/],
      ["no dtype", rawFile(t({ shape: [2], data_offsets: [0, 8] }), buf8), /tensor "t" has no dtype/],
      ["no shape", rawFile(t({ dtype: "F32", data_offsets: [0, 8] }), buf8), /tensor "t" has no shape/],
      ["bad shape", rawFile(t({ ...ok, shape: [-2] }), buf8), /tensor "t" has no shape/],
      ["no data_offsets", rawFile(t({ dtype: "F32", shape: [2] }), buf8), /tensor "t" has no data_offsets/],
      ["one offset", rawFile(t({ ...ok, data_offsets: [0] }), buf8), /tensor "t" has no data_offsets/],
      ["info not an object", rawFile(JSON.stringify({ t: 3 }), buf8), /tensor "t" has no dtype/],
      ["unknown dtype", rawFile(t({ ...ok, dtype: "F12" }), buf8), /tensor "t" has unknown dtype "F12"/],
      ["end past the buffer", rawFile(t({ ...ok, shape: [3], data_offsets: [0, 12] }), buf8), /data_offsets \[0, 12\] are out of range \(the buffer holds 8 bytes\)/],
      ["begin after end", rawFile(t({ ...ok, data_offsets: [8, 0] }), buf8), /data_offsets \[8, 0\] are out of range/],
      ["size not shape × dtype", rawFile(t({ ...ok, shape: [3] }), buf8), /hold 8 bytes, but shape \[3\] of F32 needs 12/],
      ["F16 size", rawFile(t({ ...ok, dtype: "F16" }), buf8), /hold 8 bytes, but shape \[2\] of F16 needs 4/],
      ["overlapping", rawFile(t(ok, { u: { dtype: "F32", shape: [1], data_offsets: [4, 8] } }), buf8), /tensors "t" and "u" overlap/],
      ["gap", rawFile(t({ ...ok, shape: [1], data_offsets: [4, 8] }), buf8), /gap of 4 bytes before tensor "t"/],
      ["trailing bytes", rawFile(t(ok), new Uint8Array(12)), /4 bytes after the last tensor's data/],
      ["duplicate names", rawFile(`{"t":${JSON.stringify(ok)},"t":${JSON.stringify(ok)}}`, buf8), /duplicate name "t"/],
      ["duplicate escaped", rawFile(`{"a\\"b":${JSON.stringify(ok)},"x":{"a\\"b":1},"a\\u0022b":${JSON.stringify(ok)}}`, buf8), /duplicate name "a"b"/],
      ["metadata not strings", rawFile(t(ok, { __metadata__: { n: 1 } }), buf8), /__metadata__\.n is not a string/],
      ["metadata not object", rawFile(t(ok, { __metadata__: "x" }), buf8), /__metadata__ is not an object/]
    ]
    for (const [label, bytes, message] of cases) {
      expect(() => decodeSafetensors(bytes, "f.st"), label).toThrow(SafetensorsError)
      expect(() => decodeSafetensors(bytes, "f.st"), label).toThrow(/^f\.st: /) // names the input
      expect(() => decodeSafetensors(bytes, "f.st"), label).toThrow(message)
    }
    // nested objects with the same keys are not duplicates, and a valid header still reads
    const nested = rawFile(t(ok, { __metadata__: { t: "x", dtype: "y" } }), buf8)
    expect(decodeSafetensors(nested).metadata).toEqual({ t: "x", dtype: "y" })
  })

  it("refuses to encode duplicate names or data that does not fit the shape", () => {
    const d = new Float32Array(2)
    expectSafetensorsError(() => encodeSafetensors([{ name: "a", shape: [2], data: d }, { name: "a", shape: [2], data: d }]), /duplicate tensor name "a"/)
    expectSafetensorsError(() => encodeSafetensors([{ name: "a", shape: [3], data: d }]), /shape \[3\] \(3 elements\) but 2 values/)
    expectSafetensorsError(() => encodeSafetensors([{ name: "__metadata__", shape: [2], data: d }]), /cannot be named __metadata__/)
  })
})

/** gpt-tiny params with every tensor perturbed (so biases and gains are not 0 and 1). */
const perturbedTiny = (seed: number): Map<string, Float32Array> => {
  const params = makeGpt(gptTiny).init(seed)
  const rng = new Rng(seed + 1)
  for (const v of params.values()) for (let i = 0; i < v.length; i++) v[i] += rng.normal() * 0.1
  return params
}

const asTensorMap = (list: ReadonlyArray<{ name: string; shape: readonly number[]; data: Float32Array }>) =>
  new Map(list.map((t) => [t.name, { shape: t.shape, data: t.data }]))

describe("Hugging Face GPT-2 names", () => {
  it("toHfGpt2 → safetensors → fromHfGpt2 gives back the params; names are GPT2LMHeadModel's, no lm_head", () => {
    const params = perturbedTiny(1)
    const hf = toHfGpt2(params, gptTiny)
    const names = hf.map((t) => t.name)
    expect(names.slice(0, 4)).toEqual(["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias"])
    expect(names).toContain("transformer.h.1.attn.c_attn.weight")
    expect(names.at(-1)).toBe("transformer.ln_f.bias")
    expect(names).not.toContain("lm_head.weight")
    expect(hf.find((t) => t.name === "transformer.h.0.attn.c_attn.weight")!.shape).toEqual([8, 24])
    const { tensors, metadata } = decodeSafetensors(encodeSafetensors(hf, HF_GPT2_METADATA))
    expect(metadata.format).toBe("pt")
    const back = fromHfGpt2(tensors, gptTiny)
    expect([...back.keys()].sort()).toEqual([...params.keys()].sort())
    for (const [k, v] of params) expect(Array.from(back.get(k)!), k).toEqual(Array.from(v))
  })

  it("reads bare names (GPT2Model, the Hub's gpt2), ignores attention buffers and a tied lm_head", () => {
    const params = perturbedTiny(2)
    const hf = toHfGpt2(params, gptTiny).map((t) => ({ ...t, name: t.name.replace(/^transformer\./, "") }))
    const wte = params.get("wte")!
    const extra = [
      { name: "h.0.attn.bias", shape: [1, 1, 8, 8], data: new Float32Array(64) },
      { name: "h.1.attn.masked_bias", shape: [], data: new Float32Array([-1e4]) },
      { name: "lm_head.weight", shape: [13, 8], data: wte.slice() }
    ]
    const back = fromHfGpt2(asTensorMap([...hf, ...extra]))
    expect(back.size).toBe(params.size)
    for (const [k, v] of params) expect(Array.from(back.get(k)!), k).toEqual(Array.from(v))
    expect(["h.0.attn.bias", "transformer.h.11.attn.masked_bias"].every(isHfGpt2Buffer)).toBe(true)
    expect(isHfGpt2Buffer("h.0.attn.c_attn.bias")).toBe(false)
  })

  it("skips a BOOL attn.bias buffer when decoding with isHfGpt2Buffer", () => {
    const body = encodeSafetensors(toHfGpt2(perturbedTiny(3), gptTiny))
    const N = Number(new DataView(body.buffer).getBigUint64(0, true))
    const header = JSON.parse(new TextDecoder().decode(body.subarray(8, 8 + N))) as Record<string, { data_offsets: number[] }>
    const end = Math.max(...Object.values(header).map((t) => t.data_offsets[1]))
    header["transformer.h.0.attn.bias"] = { dtype: "BOOL", shape: [1, 1, 8, 8], data_offsets: [end, end + 64] } as never
    const file = rawFile(JSON.stringify(header), new Uint8Array([...body.subarray(8 + N), ...new Uint8Array(64)]))
    expectSafetensorsError(() => decodeSafetensors(file), /"transformer.h.0.attn.bias" has dtype BOOL/)
    expect(fromHfGpt2(decodeSafetensors(file, "f", { skip: isHfGpt2Buffer }).tensors, gptTiny).size).toBe(perturbedTiny(3).size)
  })

  it("refuses an untied lm_head, unknown or missing tensors, wrong shapes, a config mismatch", () => {
    const params = perturbedTiny(4)
    const hf = toHfGpt2(params, gptTiny)
    const wte = params.get("wte")!
    const differs = wte.slice()
    differs[5] += 0.25
    const withHead = (data: Float32Array, shape = [13, 8]) => asTensorMap([...hf, { name: "lm_head.weight", shape, data }])
    expectError(HfGpt2Error, () => fromHfGpt2(withHead(differs)), /lm_head\.weight differs from wte\.weight \(max \|diff\| 0\.25/)
    expectError(HfGpt2Error, () => fromHfGpt2(withHead(new Float32Array(13 * 9), [13, 9])), /lm_head\.weight differs.*shape \[13,9\].*tied/)
    expect(fromHfGpt2(withHead(wte.slice())).size).toBe(params.size)
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap([...hf, { name: "score.weight", shape: [2], data: new Float32Array(2) }])), /not GPT-2 parameters: score\.weight/)
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap(hf.filter((t) => t.name !== "transformer.h.1.mlp.c_fc.bias"))), /missing transformer\.h\.1\.mlp\.c_fc\.bias/)
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap(hf.filter((t) => t.name !== "transformer.wte.weight"))), /no wte\.weight/)
    const transposed = hf.map((t) => (t.name === "transformer.h.0.attn.c_attn.weight" ? { ...t, shape: [24, 8] } : t))
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap(transposed)), /transformer\.h\.0\.attn\.c_attn\.weight has shape \[24,8\], expected \[8,24\]/)
    const both = [...hf, { ...hf[2], name: "h.0.ln_1.weight" }]
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap(both)), /"h\.0\.ln_1\.weight" and "transformer\.h\.0\.ln_1\.weight" are both h\.0\.ln_1\.weight/)
    expectError(HfGpt2Error, () => fromHfGpt2(asTensorMap(hf), { ...gptTiny, layers: 3 }), /tensors have layers 2, the config says 3/)
    expectError(HfGpt2Error, () => toHfGpt2(params, { ...gptTiny, width: 16 }), /has 104 values, shape \[13,16\] needs 208/)
    expectError(HfGpt2Error, () => toHfGpt2(new Map([...params, ["lm_head", wte]]), gptTiny), /not in this GPT config: lm_head/)
  })

  it("config.json: written for GPT2LMHeadModel and read back; clear errors on what Flotilla cannot compute", () => {
    const cfg: GptConfig = { vocabSize: 64, contextLength: 16, layers: 2, heads: 2, width: 16, dropout: 0 }
    const json = hfGpt2Config(cfg)
    expect(json).toMatchObject({
      model_type: "gpt2", architectures: ["GPT2LMHeadModel"], n_embd: 16, n_layer: 2, n_head: 2, n_positions: 16, n_ctx: 16,
      vocab_size: 64, activation_function: "gelu_new", layer_norm_epsilon: 1e-5, resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0,
      tie_word_embeddings: true
    })
    expect(gptConfigFromHf(JSON.parse(JSON.stringify(json)))).toEqual(cfg)
    const fixture = JSON.parse(readFileSync(new URL("./fixtures/gpt2-tiny.config.json", import.meta.url), "utf8"))
    expect(fixture).toEqual(JSON.parse(JSON.stringify(json)))
    // the Hub's gpt2 config.json: pdrops 0.1 (training only), no tie/scale fields (defaults)
    const hub = { model_type: "gpt2", vocab_size: 50257, n_positions: 1024, n_ctx: 1024, n_embd: 768, n_layer: 12, n_head: 12, activation_function: "gelu_new", layer_norm_epsilon: 1e-5, resid_pdrop: 0.1 }
    expect(gptConfigFromHf(hub)).toEqual({ vocabSize: 50257, contextLength: 1024, layers: 12, heads: 12, width: 768, dropout: 0 })
    const { n_positions: _, ...onlyCtx } = hub
    expect(gptConfigFromHf(onlyCtx).contextLength).toBe(1024)
    const bad: Array<[unknown, RegExp]> = [
      [null, /not a JSON object/],
      [{ ...hub, model_type: "llama" }, /model_type is "llama", expected "gpt2"/],
      [(({ n_embd: _e, ...rest }) => rest)(hub), /missing n_embd/],
      [(({ n_positions: _p, n_ctx: _c, ...rest }) => rest)(hub), /missing n_positions \(or n_ctx\)/],
      [{ ...hub, n_head: 1.5 }, /n_head is 1\.5, expected a positive integer/],
      [{ ...hub, n_head: 7 }, /width 768 is not divisible by heads 7/],
      [{ ...hub, activation_function: "gelu" }, /activation_function is "gelu": Flotilla computes GELU's tanh form/],
      [{ ...hub, layer_norm_epsilon: 1e-6 }, /layer_norm_epsilon is 0\.000001/],
      [{ ...hub, tie_word_embeddings: false }, /tie_word_embeddings is false: .*tied/],
      [{ ...hub, scale_attn_by_inverse_layer_idx: true }, /scale_attn_by_inverse_layer_idx is true/],
      [{ ...hub, n_inner: 1024 }, /n_inner is 1024: Flotilla's MLP is 4 × n_embd = 3072 wide/]
    ]
    for (const [j, message] of bad) expectError(HfGpt2Error, () => gptConfigFromHf(j), message)
    expect(gptConfigFromHf({ ...hub, n_inner: null, activation_function: "gelu_pytorch_tanh" }).width).toBe(768)
  })
})

describe("Flotilla GPT against GPT-2 as Hugging Face computes it (PyTorch reference)", () => {
  interface Ref { readonly tokens: number[][]; readonly logits: number[][][]; readonly float64_max_abs_diff: number }
  const ref: Ref = JSON.parse(readFileSync(new URL("./fixtures/gpt2-tiny.logits.json", import.meta.url), "utf8"))
  const file = decodeSafetensors(new Uint8Array(readFileSync(new URL("./fixtures/gpt2-tiny.safetensors", import.meta.url))), "gpt2-tiny.safetensors")
  const config = gptConfigFromHf(JSON.parse(readFileSync(new URL("./fixtures/gpt2-tiny.config.json", import.meta.url), "utf8")))
  const B = ref.tokens.length
  const T = ref.tokens[0].length
  const V = config.vocabSize
  const C = config.width
  // Tolerance: max |flotilla − torch| over all B·T·V logits, divided by max |torch logit|
  // (≈ 4.4 here). Both are float32 with different summation orders; the reference itself
  // is ~3e-6 from float64 (float64_max_abs_diff), so 1e-4 leaves room for order and none
  // for a wrong layout (each mutation below moves the logits by ≥ 0.1 of that scale).
  const TOL = 1e-4
  const scale = Math.max(...ref.logits.flat(2).map(Math.abs))

  /** max |logits(params) − torch| / max |torch|. */
  const error = (params: ReadonlyMap<string, Float32Array>): number => {
    const got = tf.tidy(() => {
      const p = new Map(makeGpt(config).specs.map((s) => [s.name, tf.tensor(params.get(s.name)!, [...s.shape], "float32")]))
      return gptLogits(config, p, tf.tensor2d(ref.tokens.flat(), [B, T], "int32")).dataSync() // [B*T, V]
    })
    let worst = 0
    for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) for (let v = 0; v < V; v++) {
      worst = Math.max(worst, Math.abs(got[(b * T + t) * V + v] - ref.logits[b][t][v]))
    }
    return worst / scale
  }

  const params = fromHfGpt2(file.tensors, config)

  it("the fixture is what the reference ran: tokens from its metadata, GPT2LMHeadModel names", () => {
    expect(JSON.parse(file.metadata.flotilla_tokens)).toEqual(ref.tokens)
    expect(file.metadata.format).toBe("pt")
    expect([B, T, ref.logits[0][0].length]).toEqual([2, 12, V])
    expect(file.tensors.has("transformer.h.1.attn.c_attn.weight")).toBe(true)
    expect(scale).toBeGreaterThan(1) // logits are not near zero: the relative bound means something
  })

  it(`gptLogits matches PyTorch's GPT-2 logits to ${TOL} of max|logit|`, () => {
    const err = error(params)
    console.log(`gpt2-tiny: max |flotilla − torch| = ${(err * scale).toExponential(2)} (${err.toExponential(2)} of max|logit| ${scale.toFixed(3)}); torch float32 vs float64 ${ref.float64_max_abs_diff.toExponential(2)}`)
    expect(err).toBeLessThan(TOL)
  })

  it("would catch a wrong layout: c_attn read as nn.Linear [3C, C], q/k swapped, c_proj transposed", () => {
    const with_ = (name: string, f: (w: Float32Array) => Float32Array) => new Map([...params, [name, f(params.get(name)!)]])
    const transpose = (w: Float32Array, rows: number, cols: number): Float32Array => {
      const out = new Float32Array(w.length) // w [rows, cols] -> [cols, rows]
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = w[r * cols + c]
      return out
    }
    const swapQK = (w: Float32Array): Float32Array => {
      const out = w.slice() // [C, 3C]: columns [0, C) are q, [C, 2C) are k
      for (let r = 0; r < C; r++) for (let c = 0; c < C; c++) {
        out[r * 3 * C + c] = w[r * 3 * C + C + c]
        out[r * 3 * C + C + c] = w[r * 3 * C + c]
      }
      return out
    }
    const mutants: Array<[string, Map<string, Float32Array>]> = [
      // the bytes taken as a [3C, C] nn.Linear weight and transposed to [C, 3C]
      ["c_attn as nn.Linear", with_("h.0.attn.c_attn.weight", (w) => transpose(w, 3 * C, C))],
      ["q and k swapped", with_("h.1.attn.c_attn.weight", swapQK)],
      ["c_proj transposed", with_("h.1.attn.c_proj.weight", (w) => transpose(w, C, C))],
      ["mlp c_proj bias dropped", with_("h.0.mlp.c_proj.bias", (w) => new Float32Array(w.length))]
    ]
    for (const [label, mutant] of mutants) {
      const err = error(mutant)
      expect(err, `${label}: ${err}`).toBeGreaterThan(100 * TOL)
    }
  })
})
