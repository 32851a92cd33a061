// Checks shared/compute/backend.ts and kernels.ts: auto picks wasm where tfjs-node is
// absent, FLOTILLA_BACKEND and explicit preferences are honoured, an unavailable backend
// fails saying what to install, the Compute layer, the UnsortedSegmentSum kernel
// against a plain-JS reference on wasm and cpu (also through gather's gradient), and
// the other wasm kernels kernels.ts replaces (Slice, SplitV, Unpack, Sum, GatherV2 and
// its gradient, Identity) against the cpu backend's.
// Run: npx vitest run test/compute.test.ts
import { createRequire } from "node:module"
import { it as effectIt } from "@effect/vitest"
import * as tf from "@tensorflow/tfjs"
import { Effect, Exit } from "effect"
import { afterEach, beforeEach, describe, expect, it } from "vitest"
import { BackendUnavailableError, Compute, initBackend, resolvePreference } from "../shared/compute/backend.ts"
import { registerKernels, segmentSumInto } from "../shared/compute/kernels.ts"
import { Rng } from "../shared/models/rng.ts"

const installed = (pkg: string): boolean => {
  try {
    createRequire(import.meta.url).resolve(pkg)
    return true
  } catch {
    return false
  }
}
const tfjsNodePresent = installed("@tensorflow/tfjs-node") || installed("@tensorflow/tfjs-node-gpu")

let savedEnv: string | undefined
beforeEach(() => {
  savedEnv = process.env.FLOTILLA_BACKEND
  delete process.env.FLOTILLA_BACKEND
})
afterEach(() => {
  if (savedEnv === undefined) delete process.env.FLOTILLA_BACKEND
  else process.env.FLOTILLA_BACKEND = savedEnv
})

describe("backend selection", () => {
  it("auto picks tensorflow where tfjs-node is installed, else wasm, and says why", async () => {
    const info = await initBackend()
    if (tfjsNodePresent) {
      expect(info.name).toBe("tensorflow")
      return
    }
    expect(info.name).toBe("wasm")
    expect(tf.getBackend()).toBe("wasm")
    expect(info.reason).toMatch(/tfjs-node.*not installed/)
    expect(info.reason).toMatch(/SIMD/)
    // Idempotent: the same object comes back.
    expect(await initBackend("auto")).toBe(info)
  })

  it("FLOTILLA_BACKEND=cpu gives cpu; an explicit argument wins over it", async () => {
    process.env.FLOTILLA_BACKEND = "cpu"
    const info = await initBackend()
    expect(info.name).toBe("cpu")
    expect(tf.getBackend()).toBe("cpu")
    expect(resolvePreference("wasm")).toBe("wasm")
    expect((await initBackend("wasm")).name).toBe("wasm")
    expect(tf.getBackend()).toBe("wasm")
  })

  it("an unknown FLOTILLA_BACKEND is rejected by name", async () => {
    process.env.FLOTILLA_BACKEND = "gpu"
    await expect(initBackend()).rejects.toThrow(/Unknown compute backend "gpu".*tensorflow, wasm, cpu, auto/)
  })

  it("an explicit tensorflow backend runs where installed, else fails with why and what to install", async () => {
    if (tfjsNodePresent) {
      expect((await initBackend("tensorflow")).name).toBe("tensorflow")
      return
    }
    const err = await initBackend("tensorflow").then(
      () => undefined,
      (e: unknown) => e
    )
    expect(err).toBeInstanceOf(BackendUnavailableError)
    const e = err as BackendUnavailableError
    expect(e._tag).toBe("BackendUnavailableError")
    expect(e.preference).toBe("tensorflow")
    expect(e.message).toMatch(/"tensorflow" is unavailable/)
    expect(e.message).toMatch(/@tensorflow\/tfjs-node: not installed/)
    expect(e.message).toMatch(/install @tensorflow\/tfjs-node/)
    // The process keeps whatever backend it had.
    expect(["wasm", "cpu"]).toContain(tf.getBackend())
  })
})

describe("Compute service", () => {
  effectIt.effect("Compute.layer provides the chosen backend", () =>
    Effect.gen(function* () {
      const c = yield* Compute
      expect(c.backend).toBe("cpu")
      expect(c.tf.getBackend()).toBe("cpu")
    }).pipe(Effect.provide(Compute.layer("cpu")))
  )

  effectIt.effect("Compute.layer(\"tensorflow\") fails with BackendUnavailableError where tfjs-node is absent", () =>
    Effect.gen(function* () {
      const exit = yield* Effect.exit(Compute.use(() => Effect.void).pipe(Effect.provide(Compute.layer("tensorflow"))))
      if (tfjsNodePresent) return expect(Exit.isSuccess(exit)).toBe(true)
      expect(Exit.isFailure(exit)).toBe(true)
      const failure = Exit.isFailure(exit) ? exit.cause : undefined
      expect(String(failure)).toMatch(/BackendUnavailableError|is unavailable/)
    })
  )
})

/** Plain-JS reference for UnsortedSegmentSum: written independently of segmentSumInto. */
const reference = (x: number[][], ids: number[], numSegments: number): number[][] => {
  const out = Array.from({ length: numSegments }, () => new Array<number>(x[0].length).fill(0))
  ids.forEach((s, i) => {
    if (s >= 0 && s < numSegments) x[i].forEach((v, j) => (out[s][j] += v))
  })
  return out
}

describe.each(["wasm", "cpu"] as const)("UnsortedSegmentSum on %s", (backend) => {
  beforeEach(async () => {
    await initBackend(backend)
    registerKernels()
  })

  it("matches the reference on random input (incl. out-of-range ids, empty segments)", async () => {
    const rng = new Rng(7)
    const N = 300
    const inner = 17
    const S = 40
    const x = Array.from({ length: N }, () => Array.from({ length: inner }, () => rng.normal()))
    const ids = Array.from({ length: N }, () => rng.int(S + 6) - 3) // some ids < 0 or >= S: dropped
    const got = tf.tidy(() => tf.unsortedSegmentSum(tf.tensor2d(x), tf.tensor1d(ids, "int32"), S).arraySync())
    const want = reference(x, ids, S)
    expect(got.length).toBe(S)
    for (let s = 0; s < S; s++) for (let j = 0; j < inner; j++) expect(got[s][j]).toBeCloseTo(want[s][j], 4)
  })

  it("handles multi-dimensional segment ids and int32 data", () => {
    // x: [2, 3, 2], ids: [2, 3] -> out [4, 2]
    const x = tf.tensor3d([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [2, 3, 2], "int32")
    const ids = tf.tensor2d([0, 3, 0, 1, 1, 3], [2, 3], "int32")
    // The op's typing says 1-D ids; the kernel contract (TensorFlow's) allows any prefix shape.
    const out = tf.unsortedSegmentSum(x, ids as unknown as tf.Tensor1D, 4)
    expect(out.dtype).toBe("int32")
    expect(out.arraySync()).toEqual([
      [6, 8],
      [16, 18],
      [0, 0],
      [14, 16]
    ])
    tf.dispose([x, ids, out])
  })

  it("gives gather's (embedding) gradient, with a 10k-row table", () => {
    const rng = new Rng(3)
    const V = 10_000
    const C = 8
    const idx = Array.from({ length: 500 }, () => rng.int(V))
    const w = Array.from({ length: idx.length * C }, () => rng.normal())
    const grad = tf.tidy(() => {
      const table = tf.zeros([V, C])
      const wt = tf.tensor2d(w, [idx.length, C])
      const g = tf.grad((t: tf.Tensor) => tf.sum(tf.mul(tf.gather(t, tf.tensor1d(idx, "int32")), wt)))(table)
      return g.dataSync().slice()
    })
    const want = new Float32Array(V * C)
    segmentSumInto(w, idx, C, V, want)
    let maxErr = 0
    for (let i = 0; i < want.length; i++) maxErr = Math.max(maxErr, Math.abs(grad[i] - want[i]))
    expect(maxErr).toBeLessThan(1e-4)
  })
})

describe("replaced wasm kernels agree with the cpu backend", () => {
  const rng = new Rng(21)
  const values = (shape: number[]) => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal())
  /** Run `f` on fresh tensors of `inputs` on a backend; return the outputs' values and shapes. */
  const on = async (backend: "wasm" | "cpu", inputs: Array<[Float32Array, number[]]>, f: (...xs: tf.Tensor[]) => tf.Tensor[]) => {
    await initBackend(backend)
    return tf.tidy(() => f(...inputs.map(([v, s]) => tf.tensor(v, s))).map((t) => ({ shape: t.shape, data: Array.from(t.dataSync()) })))
  }
  const same = async (inputs: Array<[Float32Array, number[]]>, f: (...xs: tf.Tensor[]) => tf.Tensor[], digits?: number) => {
    const want = await on("cpu", inputs, f)
    const got = await on("wasm", inputs, f)
    expect(got.map((g) => g.shape)).toEqual(want.map((w) => w.shape))
    got.forEach((g, i) => {
      if (digits === undefined) expect(g.data).toEqual(want[i].data)
      else g.data.forEach((v, j) => expect(v).toBeCloseTo(want[i].data[j], digits))
    })
  }

  it("Slice: contiguous, strided and whole-axis cases, ranks 1-4", async () => {
    await same([[values([40]), [40]]], (x) => [tf.slice(x, 3, 30)])
    await same([[values([6, 7]), [6, 7]]], (x) => [tf.slice(x, [1, 2], [4, 3]), tf.slice(x, [2, 0], [3, -1])])
    await same([[values([4, 5, 6]), [4, 5, 6]]], (x) => [tf.slice(x, [1, 1, 2], [2, 3, 4]), tf.slice(x, [0, 2, 0], [-1, 2, -1])])
    await same([[values([3, 4, 5, 2]), [3, 4, 5, 2]]], (x) => [tf.slice(x, [1, 0, 1, 0], [2, 4, 3, 2]), tf.slice(x, [0, 0, 0, 0], [3, 4, 5, 2])])
  })

  it("SplitV and Unpack along every axis", async () => {
    const shape = [3, 8, 5]
    const v = values(shape)
    for (const axis of [0, 1, 2]) {
      await same([[v, shape]], (x) => tf.unstack(x, axis))
    }
    await same([[v, shape]], (x) => tf.split(x, [3, 1, 4], 1))
    await same([[v, shape]], (x) => tf.split(x, 3, 0))
  })

  it("Sum over leading axes (ours) and other axes (stock), with keepDims", async () => {
    const shape = [64, 3, 7]
    const v = values(shape)
    await same([[v, shape]], (x) => [tf.sum(x, 0), tf.sum(x, [0, 1]), tf.sum(x, 0, true), tf.sum(x, -1), tf.sum(x, 1), tf.sum(x)], 4)
  })

  describe("GatherV2", () => {
    const ints = (n: number, below: number) => Array.from({ length: n }, () => rng.int(below))

    it("is replaced on wasm", async () => {
      await initBackend("wasm")
      expect(registerKernels()).toContain("GatherV2@wasm")
    })

    it("axis 0: 1-D, 2-D and 3-D indices into 1-D, 2-D and 3-D params (repeats, empty)", async () => {
      const i1 = ints(17, 50)
      const i2 = ints(20, 50)
      const i3 = ints(24, 20)
      const iFlat = ints(12, 30)
      const iEmb = ints(3200, 10_000)
      await same([[values([50, 6]), [50, 6]]], (x) => [
        tf.gather(x, tf.tensor1d(i1, "int32")),
        tf.gather(x, tf.tensor2d(i2, [4, 5], "int32")),
        tf.gather(x, tf.tensor3d(i2.slice(0, 12), [2, 3, 2], "int32")),
        tf.gather(x, tf.tensor1d([], "int32")),
        tf.gather(x, tf.tensor1d([49, 0, 49], "int32"), -2) // axis -2 is axis 0 here
      ])
      await same([[values([20, 3, 4]), [20, 3, 4]]], (x) => [
        tf.gather(x, tf.tensor1d(i3.slice(0, 9), "int32")),
        tf.gather(x, tf.tensor2d(i3.slice(0, 8), [2, 4], "int32")),
        tf.gather(x, tf.tensor3d(i3, [2, 3, 4], "int32"))
      ])
      await same([[values([30]), [30]]], (x) => [tf.gather(x, tf.tensor2d(iFlat, [3, 4], "int32"))])
      // The classifier's embedding lookup, at its size.
      await same([[values([10_000, 64]), [10_000, 64]]], (x) => [tf.gather(x, tf.tensor1d(iEmb, "int32"))])
    })

    it("its gradient (through UnsortedSegmentSum) equals cpu's, for 1-D and 2-D indices", async () => {
      const i1 = ints(40, 25)
      const i2 = ints(30, 25)
      const w1 = values([40, 3, 2])
      const w2 = values([5, 6, 3, 2])
      await same(
        [[values([25, 3, 2]), [25, 3, 2]]],
        (x) => {
          const loss = (t: tf.Tensor) =>
            tf.add(
              tf.sum(tf.mul(tf.gather(t, tf.tensor1d(i1, "int32")), tf.tensor(w1, [40, 3, 2]))),
              tf.sum(tf.mul(tf.gather(t, tf.tensor2d(i2, [5, 6], "int32")), tf.tensor(w2, [5, 6, 3, 2])))
            )
          return [tf.grad(loss)(x)]
        },
        4
      )
    })

    // batchDims > 0 also goes to the stock kernel, but is not checked here: the stock wasm
    // kernel (tfjs-backend-wasm 4.22) reads out of bounds with it (garbage values or a
    // RuntimeError); nothing in Flotilla gathers with batch dims.
    it("other axes and dtypes fall back to the stock kernel", async () => {
      const iv = ints(7, 4)
      await same([[values([5, 4, 3]), [5, 4, 3]]], (x) => [
        tf.gather(x, tf.tensor1d(iv, "int32"), 1), // axis 1
        tf.gather(x, tf.tensor1d(iv.map((i) => i % 3), "int32"), -1), // last axis
        tf.gather(tf.tensor(Int32Array.from({ length: 60 }, (_, i) => i * 3 - 7), [5, 4, 3], "int32"), tf.tensor1d(iv, "int32")), // int32 params
        tf.gather(tf.tensor([true, false, true, true, false], [5], "bool"), tf.tensor1d(iv, "int32")) // bool params
      ])
    })

    it("rejects out-of-range indices as the stock kernels do, leaving no tensor behind", async () => {
      for (const backend of ["cpu", "wasm"] as const) {
        await initBackend(backend)
        const x = tf.tensor2d([1, 2, 3, 4, 5, 6], [3, 2])
        const before = tf.memory().numTensors
        for (const bad of [3, -1]) {
          const ids = tf.tensor1d([0, bad, 1], "int32")
          expect(() => tf.gather(x, ids)).toThrow(`GatherV2: the index value ${bad} is not in [0, 2]`)
          ids.dispose()
        }
        expect(tf.memory().numTensors).toBe(before)
        x.dispose()
      }
    })
  })

  it("Identity (a shared buffer) survives disposing either handle", async () => {
    await initBackend("wasm")
    const x = tf.tensor1d([1, 2, 3])
    const y = tf.clone(x) // goes through the Identity kernel
    x.dispose()
    expect(Array.from(y.dataSync())).toEqual([1, 2, 3])
    const z = tf.clone(y)
    y.dispose()
    expect(Array.from(z.dataSync())).toEqual([1, 2, 3])
    z.dispose()
  })
})
