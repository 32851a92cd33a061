// Implements: tests of the codec registry (shared/wire/codecs.ts) through the wire format
// (shared/wire/tensor.ts): every codec round-trips within its error bound, error feedback
// keeps the accumulated error equal to the residual and bounded, non-finite input reaches
// the receiver, decode rejects inconsistent bundles with a reason, and the byte sizes.
// Run: npx vitest run test/codecs.test.ts
// Does not own: the f32/int8 bundle basics, frames and CRC (test/wire.test.ts).
import { describe, expect, it } from "vitest"
import { Result } from "effect"
import { CODEC_KINDS, codecName, decodeTensor, encodedBytes, encodeTensor, F32, isLossy, parseCodec, topkCount } from "../shared/wire/codecs.ts"
import type { CodecSpec } from "../shared/wire/codecs.ts"
import { decodeBundle, encodeBundle, manifestToJson } from "../shared/wire/tensor.ts"
import type { BundleMeta, WireTensor } from "../shared/wire/tensor.ts"

/** mulberry32: a seeded uniform [0, 1) */
const prng = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const rand = prng(42)
const gauss = (r = rand) => Math.sqrt(-2 * Math.log(1 - r())) * Math.cos(2 * Math.PI * r())
const randn = (n: number, scale = 1) => Float32Array.from({ length: n }, () => gauss() * scale)

const spec = (name: string): CodecSpec => {
  const r = parseCodec(name)
  if (Result.isFailure(r)) throw new Error(r.failure)
  return r.success
}
const meta = (codec: string): BundleMeta => ({ kind: "grads", job: "t", version: 1, step: 1, sender: "w-0", codec })
const LOSSY = ["bf16", "int8", "int4", "sign1", "topk:0.1"]
const ALL = ["f32", ...LOSSY]

/** `t` after encodeBundle → manifest JSON → decodeBundle, and the payload's size. */
const viaWire = (t: WireTensor, codec = "f32", shift = 0) => {
  const { manifest, payload } = Result.getOrThrow(encodeBundle({ meta: meta(codec), tensors: [t] }))
  const at = new Uint8Array(payload.length + shift).subarray(shift) // shift 1: an unaligned payload
  at.set(payload)
  const back = decodeBundle(manifestToJson(manifest), at)
  if (Result.isFailure(back)) throw new Error(`${back.failure.reason}: ${back.failure.message}`)
  return { t: back.success.tensors[0], bytes: payload.length }
}
const decodeVia = (c: CodecSpec, x: Float32Array, shape: ReadonlyArray<number> = [x.length], residual?: Float32Array) =>
  decodeTensor(viaWire(encodeTensor(c, "g", shape, x, residual), codecName(c)).t)

/** per block of `bs` elements: [start, end) */
const blocks = (n: number, bs: number) => Array.from({ length: Math.ceil(n / bs) }, (_, b) => [b * bs, Math.min(n, (b + 1) * bs)] as const)
const norm = (v: ArrayLike<number>) => Math.sqrt(Array.from(v).reduce((a, x) => a + x * x, 0))

describe("every codec round-trips through the wire within its bound", () => {
  const cases: Array<[string, ReadonlyArray<number>]> = [[[], "scalar"], [[1]], [[7]], [[257]], [[1001]], [[13, 77]]].map(([shape]) => [
    `shape [${shape}]`,
    shape as ReadonlyArray<number>
  ])
  for (const [what, shape] of cases) {
    const n = shape.reduce((a, b) => a * b, 1)
    const x = randn(n, 3)

    it(`f32 ${what}: exact, the data shared on encode`, () => {
      const w = encodeTensor(F32, "g", shape, x)
      expect(w.data).toBe(x)
      expect(Array.from(decodeTensor(viaWire(w).t))).toEqual(Array.from(x))
    })

    it(`bf16 ${what}: |err| ≤ 2^-8·|x|`, () => {
      const y = decodeVia(spec("bf16"), x, shape)
      for (let i = 0; i < n; i++) expect(Math.abs(y[i] - x[i])).toBeLessThanOrEqual(2 ** -8 * Math.abs(x[i]))
    })

    for (const [name, qmax, bs] of [["int8", 127, 256], ["int4", 7, 128]] as const) {
      for (const blockSize of [undefined, 64]) {
        it(`${name}${blockSize ? ` block ${blockSize}` : ""} ${what}: scale = absmax/${qmax} per block, |err| ≤ scale/2`, () => {
          const c = { kind: name, blockSize } as CodecSpec
          const w = viaWire(encodeTensor(c, "g", shape, x), name).t
          expect(w.dtype).toBe(name)
          const y = decodeTensor(w)
          for (const [b, [s0, s1]] of blocks(n, blockSize ?? bs).entries()) {
            const absmax = Math.max(...Array.from(x.subarray(s0, s1), Math.abs))
            const scale = Math.fround(absmax / qmax)
            expect(w.scales![b]).toBe(scale)
            for (let i = s0; i < s1; i++) expect(Math.abs(y[i] - x[i])).toBeLessThanOrEqual(scale / 2 + 1e-6 * scale)
          }
        })
      }
    }

    it(`sign1 ${what}: decoded = sign(x)·mean|x| of its block`, () => {
      const y = decodeVia(spec("sign1"), x, shape)
      for (const [s0, s1] of blocks(n, 256)) {
        let sum = 0
        for (let i = s0; i < s1; i++) sum += Math.abs(x[i])
        const mean = sum / (s1 - s0)
        for (let i = s0; i < s1; i++) {
          expect(Math.sign(y[i])).toBe(x[i] < 0 ? -1 : 1)
          expect(Math.abs(Math.abs(y[i]) - mean)).toBeLessThanOrEqual(1e-6 * mean)
        }
      }
    })

    it(`topk:0.1 ${what}: exactly the k largest |x|, exact, zeros elsewhere`, () => {
      const k = topkCount(0.1, n)
      expect(k).toBe(Math.max(1, Math.ceil(0.1 * n)))
      const w = viaWire(encodeTensor(spec("topk:0.1"), "g", shape, x), "topk:0.1").t
      expect([w.dtype, w.data.length, w.indices!.length]).toEqual(["topk", k, k])
      const y = decodeTensor(w)
      const largest = new Set(Array.from(x.keys()).sort((a, b) => Math.abs(x[b]) - Math.abs(x[a])).slice(0, k))
      for (let i = 0; i < n; i++) expect(y[i]).toBe(largest.has(i) ? x[i] : 0)
    })
  }

  it("bf16 rounds to nearest even, keeps every NaN a NaN, ±Inf and -0", () => {
    const x = Float32Array.of(1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 2 ** -8 + 2 ** -20), 0, 0, -Infinity, -0, 3e-39)
    const u = new Uint32Array(x.buffer)
    u[4] = 0x7f800001 // NaN with only a low payload bit: plain rounding would give +Inf
    u[5] = 0xffffffff // NaN with every payload bit: plain rounding would carry into -0
    for (const residual of [undefined, new Float32Array(x.length)]) {
      const y = decodeTensor(encodeTensor(spec("bf16"), "g", [x.length], x, residual))
      expect(Array.from(y.subarray(0, 4))).toEqual([1, 1 + 2 ** -6, 1 + 2 ** -7, -(1 + 2 ** -7)])
      // (-0 + a residual of 0 is +0)
      expect([Number.isNaN(y[4]), Number.isNaN(y[5]), y[6], Object.is(y[7], residual ? 0 : -0)]).toEqual([true, true, -Infinity, true])
      expect(Math.abs(y[8] - 3e-39)).toBeLessThan(2 ** -133) // subnormal: an absolute bound
    }
  })

  it("topk keeps k among ties and sorts its indices", () => {
    const x = Float32Array.of(1, -3, 3, 0, 3, -3, 2)
    const w = encodeTensor(spec("topk:0.5"), "g", [7], x) // k = 4 of the four ±3
    expect(Array.from(w.indices!)).toEqual([1, 2, 4, 5])
    const residual = new Float32Array(7)
    const w2 = encodeTensor(spec("topk:0.3"), "g", [7], x, residual) // k = 3 of the four ±3: any three
    expect(w2.indices!.length).toBe(3)
    expect(Array.from(w2.data).every((v) => Math.abs(v) === 3)).toBe(true)
    // what was not sent is owed, the fourth 3 included
    const y = decodeTensor(w2)
    expect(Array.from(x, (v, i) => y[i] + residual[i])).toEqual(Array.from(x))
    expect(residual.filter((v) => Math.abs(v) === 3).length).toBe(1)
  })

  it("decodes bf16 and topk from an unaligned payload (copies) like from an aligned one (views)", () => {
    const x = randn(33)
    for (const name of ["bf16", "topk:0.2", "int4", "sign1"]) {
      const w = encodeTensor(spec(name), "g", [33], x)
      expect(Array.from(decodeTensor(viaWire(w, name, 1).t))).toEqual(Array.from(decodeTensor(w)))
    }
  })

  it("encodes and decodes empty tensors under every codec", () => {
    for (const name of ALL) {
      const { t, bytes } = viaWire(encodeTensor(spec(name), "g", [0, 5], new Float32Array(0)), name)
      expect(decodeTensor(t).length).toBe(0)
      expect(bytes).toBe(encodedBytes(spec(name), 0))
    }
  })
})

describe("error feedback", () => {
  const n = 2048
  const steps = 300
  // a small persistent signal under unit noise: the case error feedback is for
  const mu = Float32Array.from({ length: n }, (_, i) => 0.3 * Math.sin(i))
  const run = (name: string) => {
    const c = spec(name)
    const r = prng(7)
    const residual = new Float32Array(n)
    const sumX = new Float64Array(n)
    const sumFb = new Float64Array(n)
    const sumPlain = new Float64Array(n)
    const at: Record<number, { fb: number; plain: number; residual: number; identity: number }> = {}
    for (let t = 1; t <= steps; t++) {
      const x = Float32Array.from({ length: n }, (_, i) => mu[i] + gauss(r))
      const yFb = decodeVia(c, x, [n], residual)
      const yPlain = decodeTensor(encodeTensor(c, "g", [n], x))
      for (let i = 0; i < n; i++) {
        sumX[i] += x[i]
        sumFb[i] += yFb[i]
        sumPlain[i] += yPlain[i]
      }
      if (t === 50 || t === steps) {
        const gap = sumX.map((s, i) => s - sumFb[i])
        at[t] = {
          fb: norm(gap),
          plain: norm(sumX.map((s, i) => s - sumPlain[i])),
          residual: norm(residual),
          identity: norm(gap.map((g, i) => g - residual[i])) // Σx − Σy − r, zero up to float error
        }
      }
    }
    return at
  }
  for (const name of LOSSY) {
    it(`${name}: ‖Σx − Σdecode‖ = ‖residual‖ and stays bounded over ${steps} steps`, () => {
      const at = run(name)
      for (const t of [50, steps]) {
        // float32 rounding of the residual, ~1e-5 here; ‖residual‖ is ≥ 0.07 (bf16)
        expect(at[t].identity).toBeLessThan(1e-3)
        expect(Math.abs(at[t].fb - at[t].residual)).toBeLessThan(1e-3)
      }
      expect(at[steps].fb).toBeLessThanOrEqual(2 * at[50].fb)
      expect(at[steps].fb).toBeLessThan(at[steps].plain)
      if (name === "sign1" || name.startsWith("topk")) {
        // without feedback the biased error grows with the steps, far past the fed-back one
        expect(at[steps].plain).toBeGreaterThan(3 * at[50].plain)
        expect(at[steps].plain).toBeGreaterThan(5 * at[steps].fb)
      }
    })
  }

  it("f32 with a residual sends x + residual and clears it", () => {
    const x = randn(10)
    const r = randn(10)
    const want = x.map((v, i) => v + r[i])
    expect(Array.from(decodeTensor(encodeTensor(F32, "g", [10], x, r)))).toEqual(Array.from(want))
    expect(Array.from(r)).toEqual(new Array(10).fill(0))
  })
})

describe("non-finite input reaches the receiver", () => {
  const n = 600
  for (const name of LOSSY) {
    for (const bad of [NaN, Infinity, -Infinity]) {
      it(`${name} with ${bad}: a non-finite decode there, the residual reset`, () => {
        const x = randn(n)
        x[300] = bad
        const residual = new Float32Array(n).fill(0.25)
        const y = decodeVia(spec(name), x, [n], residual)
        expect(Number.isFinite(y[300])).toBe(false)
        if (Number.isNaN(bad) || name === "int8" || name === "int4" || name === "sign1") expect(Number.isNaN(y[300])).toBe(true)
        const [s0, s1] = name === "int8" || name === "sign1" ? [256, 512] : name === "int4" ? [256, 384] : [300, 301]
        for (let i = s0; i < s1; i++) expect(Number.isFinite(y[i])).toBe(name === "topk:0.1" ? i !== 300 : false)
        for (let i = s0; i < s1; i++) expect(residual[i]).toBe(0)
        expect(residual.every(Number.isFinite)).toBe(true)
        expect(y.filter((v) => !Number.isFinite(v)).length).toBe(s1 - s0 === 1 || name === "topk:0.1" ? 1 : s1 - s0)
      })
    }
  }

  it("topk resets the residual of non-finite values it could not keep", () => {
    const x = Float32Array.of(NaN, 1, NaN, Infinity, 2, NaN)
    const residual = new Float32Array(6)
    const w = encodeTensor(spec("topk:0.1"), "g", [6], x, residual) // k = 1: one NaN kept
    expect(Number.isNaN(w.data[0])).toBe(true)
    expect(Array.from(residual)).toEqual([0, 1, 0, 0, 2, 0])
  })
})

describe("decode rejects inconsistent tensors with a reason", () => {
  const x = randn(50)
  const tensors = [
    encodeTensor(spec("bf16"), "h", [50], x),
    encodeTensor(spec("int4"), "q4", [5, 10], x),
    encodeTensor(spec("sign1"), "s", [50], x),
    encodeTensor(spec("topk:0.1"), "k", [50], x)
  ]
  const good = Result.getOrThrow(encodeBundle({ meta: meta("topk:0.1"), tensors }))
  const m = () => JSON.parse(manifestToJson(good.manifest))
  const reasonOf = (manifest: unknown, payload = good.payload) => {
    const r = decodeBundle(manifest, payload)
    return Result.isFailure(r) ? `${r.failure.reason}: ${r.failure.message}` : "ok"
  }
  /** the payload with topk index j set to v */
  const withIndex = (j: number, v: number) => {
    const p = Uint8Array.from(good.payload)
    new DataView(p.buffer).setUint32(good.manifest.tensors[3].indexOffset! + 4 * j, v, true)
    return p
  }
  const cases: Array<[string, () => unknown, string, Uint8Array?]> = [
    ["bf16 byteLength 4n", () => { const y = m(); y.tensors[0].byteLength = 200; return y }, "byte-length-mismatch"],
    ["int4 byteLength n", () => { const y = m(); y.tensors[1].byteLength = 50; return y }, "byte-length-mismatch"],
    ["sign1 byteLength n/4", () => { const y = m(); y.tensors[2].byteLength = 13; return y }, "byte-length-mismatch"],
    ["topk byteLength ≠ 4k", () => { const y = m(); y.tensors[3].byteLength = 24; return y }, "byte-length-mismatch"],
    ["int4 without scales", () => { const y = m(); delete y.tensors[1].scalesOffset; return y }, "bad-scales"],
    ["sign1 without blockSize", () => { const y = m(); delete y.tensors[2].blockSize; return y }, "bad-scales"],
    ["bf16 with scales", () => { const y = m(); y.tensors[0].blockSize = 4; return y }, "bad-scales"],
    ["topk k > numel", () => { const y = m(); y.tensors[3].k = 51; y.tensors[3].byteLength = 204; return y }, "bad-index"],
    ["topk k = 0 of 50", () => { const y = m(); y.tensors[3].k = 0; y.tensors[3].byteLength = 0; return y }, "bad-index"],
    ["topk without indexOffset", () => { const y = m(); delete y.tensors[3].indexOffset; return y }, "bad-index"],
    ["k on a bf16 tensor", () => { const y = m(); y.tensors[0].k = 3; return y }, "bad-index"],
    ["indices past the payload", () => { const y = m(); y.tensors[3].indexOffset += 8; return y }, "out-of-bounds"],
    ["indices misaligned", () => { const y = m(); y.tensors[3].indexOffset += 2; return y }, "misaligned"],
    ["indices over the values", () => { const y = m(); y.tensors[3].indexOffset -= 4; return y }, "overlap"],
    ["indices not increasing", m, "bad-index", withIndex(1, 0)],
    ["an index ≥ numel", m, "bad-index", withIndex(4, 50)],
    ["unknown codec name", () => { const y = m(); y.meta.codec = "int3"; return y }, "unknown-codec"],
    ["unknown dtype", () => { const y = m(); y.tensors[0].dtype = "int2"; return y }, "bad-manifest"]
  ]
  for (const [what, make, reason, payload] of cases) {
    it(`${what} → ${reason}`, () => expect(reasonOf(make(), payload)).toMatch(new RegExp(`^${reason}: .+`)))
  }
  it("names the known codecs for an unknown one, and still takes the old int8-block", () => {
    const y = m()
    y.meta.codec = "fp8"
    expect(reasonOf(y)).toMatch(/"fp8".*f32, bf16, int8.*int4, sign1, topk:<fraction/)
    y.meta.codec = "int8-block"
    expect(reasonOf(y)).toBe("ok")
    expect(reasonOf(m())).toBe("ok")
  })

  it("decodeTensor throws a RangeError naming the problem", () => {
    const [h, q4, s, k] = tensors
    const bad = (t: WireTensor) => () => decodeTensor(t)
    expect(bad({ ...k, indices: Uint32Array.of(0, 0, 1, 2, 3) })).toThrow(/indices\[1\] = 0 must be > 0 \(strictly increasing\)/)
    expect(bad({ ...k, indices: Uint32Array.of(0, 1, 2, 3, 50) })).toThrow(/indices\[4\] = 50 .* < 50/)
    expect(bad({ ...k, indices: undefined })).toThrow(/needs a Uint32Array of indices/)
    expect(bad({ ...k, shape: [4] })).toThrow(/k = 5 kept values must be in \[1, 4\]/)
    expect(bad({ ...h, data: new Uint16Array(49) })).toThrow(RangeError)
    expect(bad({ ...s, scales: undefined })).toThrow(/scales/)
    expect(bad({ ...q4, blockSize: undefined })).toThrow(/blockSize/)
    expect(bad({ name: "ids", dtype: "int32", shape: [1], data: Int32Array.of(1) })).toThrow(/int32/)
  })

  it("encodeBundle refuses topk without indices, bad indices, and data of the wrong size or class", () => {
    const [h, q4, , k] = tensors
    const reason = (t: WireTensor) => {
      const r = encodeBundle({ meta: meta("f32"), tensors: [t] })
      return Result.isFailure(r) ? r.failure.reason : "ok"
    }
    expect(reason({ ...k, indices: undefined })).toBe("bad-index")
    expect(reason({ ...k, indices: Uint32Array.of(3, 2, 5, 6, 7) })).toBe("bad-index")
    expect(reason({ ...k, data: new Float32Array(4) })).toBe("length-mismatch")
    expect(reason({ ...q4, data: new Uint8Array(50) })).toBe("length-mismatch")
    expect(reason({ ...h, data: new Float32Array(50) })).toBe("dtype-mismatch")
    expect(reason({ ...q4, data: new Int8Array(25) })).toBe("dtype-mismatch")
  })
})

describe("codec names", () => {
  it("parses every name, the old alias included, and names each canonically", () => {
    expect(ALL.map((n) => codecName(spec(n)))).toEqual(ALL)
    expect(codecName(spec("int8-block"))).toBe("int8")
    expect(codecName(spec("topk:1e-2"))).toBe("topk:0.01")
    expect(spec("topk:1")).toEqual({ kind: "topk", fraction: 1 })
    expect(CODEC_KINDS.map((k) => isLossy({ kind: k, fraction: 0.5 }))).toEqual([false, true, true, true, true, true])
  })

  for (const bad of ["topk:0", "topk:2", "topk:-0.1", "topk:", "topk", "topk:abc", "topk:NaN", "topk:0x1", "int3", "", " f32", "F32"]) {
    it(`rejects ${JSON.stringify(bad)} with a message`, () => {
      const r = parseCodec(bad)
      expect(Result.isFailure(r)).toBe(true)
      if (Result.isFailure(r)) expect(r.failure).toMatch(bad.startsWith("topk") ? /topk needs the fraction kept, a number in \(0, 1\]/ : /known codecs are f32, bf16, int8.*topk:<fraction/)
    })
  }
})

describe("bytes", () => {
  it("encodedBytes is the payload of a one-tensor bundle, for every codec and odd lengths", () => {
    for (const name of ALL) {
      for (const n of [1, 3, 7, 257, 1001, 4097]) {
        const c = spec(name)
        expect([name, n, viaWire(encodeTensor(c, "g", [n], randn(n)), name).bytes]).toEqual([name, n, encodedBytes(c, n)])
      }
    }
  })

  const M = 1 << 20
  const ratio = (name: string) => (4 * M) / encodedBytes(spec(name), M)
  const r = Object.fromEntries(["bf16", "int8", "int4", "sign1", "topk:0.01"].map((n) => [n, ratio(n).toFixed(2)]))
  it(`1M floats vs f32: bf16 ${r.bf16}×, int8 ${r.int8}×, int4 ${r.int4}×, sign1 ${r.sign1}×, topk:0.01 ${r["topk:0.01"]}×`, () => {
    expect(ratio("bf16")).toBe(2)
    expect(ratio("int8")).toBeGreaterThanOrEqual(3.9)
    expect(ratio("int4")).toBeGreaterThanOrEqual(7)
    expect(ratio("sign1")).toBeGreaterThanOrEqual(25)
    expect(ratio("topk:0.01")).toBeGreaterThanOrEqual(49)
    const x = randn(M)
    for (const name of ["int4", "sign1", "topk:0.01"]) expect(viaWire(encodeTensor(spec(name), "g", [M], x), name).bytes).toBe(encodedBytes(spec(name), M))
  })
})
