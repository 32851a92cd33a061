// Implements: the TensorFlow.js kernels Flotilla's training needs that a backend lacks
// or runs pathologically slowly, registered by `registerKernels()`.
// Owns: kernel code and registration. Does not own: backend choice (backend.ts) or the
// differentiable ops built on top (ops.ts).
//
// What was found missing or slow (forward + backward of gpt.ts and lstm-classifier.ts,
// run on each backend and seeing what throws or what dominates a profile), and what is
// registered here:
//   - UnsortedSegmentSum (wasm, cpu): the gradient of `gather` (embedding backward).
//     The wasm backend has no kernel at all; the cpu backend's stock kernel loops over
//     every segment with a full-size mask (18.6 s for gpt-mini, 252 s for a 10k vocab).
//     Replaced on both by one pass that adds each row into its segment slot.
//   - Identity (wasm): tfjs' engine clones, through Identity, every tensor an op saves
//     for its backward pass, and the stock wasm kernel copies the buffer each time
//     (~8% of a gpt-mini step's CPU time, ~300 MB more heap). Tensors are
//     immutable, so the clone shares the buffer with a reference count, exactly as the
//     wasm backend's own Reshape and the cpu backend's Identity do.
//   - Slice, SplitV, Unpack (wasm): the stock Slice reads its input with readSync, which
//     copies the whole tensor out of the heap for every slice taken, so unstacking the
//     LSTM's [L, B, 4H] input projection into L steps copied it L times (a classifier
//     step went from ~1 s to ~0.23 s) and every split of GPT's fused qkv copied
//     [B*T, 3C] three times (~15% of a gpt-mini step). Replaced by the
//     same slicing done on heap views (SplitV and Unpack call Slice internally). String
//     tensors still go to the stock kernels.
//   - Sum (wasm) over leading axes, which is every bias and LayerNorm gradient: the
//     stock kernel transposes the reduced axes to the end first (22 ms for gpt-mini's
//     [4096, 512] -> [512], 6 ms for [4096, 128]); accumulating rows takes 3.2 / 0.6 ms,
//     ~0.3 s of a gpt-mini step. Sums over trailing axes keep the stock kernel.
//   - GatherV2 (wasm) on axis 0, float32 params, int32 indices: every embedding lookup.
//     The stock kernel's C++ loop costs ~30 ns an element: 6.1-6.4 ms for the
//     classifier's [10000, 64] table by 3200 ids, 17-20 ms for gpt-mini's [256, 128] wte
//     by 4096; copying the rows between heap views takes 0.42-0.44 ms for either. A
//     classifier step's CPU time went from 62-66 to 56-59 ms (stock and ours alternated
//     in one process); gpt-mini's ~2.6 s step does not change measurably (all on a
//     loaded 2-core machine). Out-of-range indices throw the stock message; other axes,
//     batchDims (which the stock kernel reads out of bounds with) and dtypes keep the
//     stock kernel.
// Tried and not kept: a cache-blocked JS Transpose. It halves large 2-D transposes but
// is 2-9x slower than the stock kernel on the batched 3-D/4-D ones attention does, and
// the 2-D ones are ~2% of a step.
// Everything else the two models use (Softmax, the tanh-GELU pieces, Softplus, OneHot,
// Pack, Concat, PadV2, Transpose, BatchMatMul, Select, Step, ...) exists on wasm;
// test/models.grad.test.ts runs both models' forward and backward there, and
// test/compute.test.ts checks each kernel here against the cpu backend.

import * as tf from "@tensorflow/tfjs"

/** The backends whose UnsortedSegmentSum is replaced. tfjs-node's "tensorflow" has a
 *  native one; webgl is not used under Node. */
const SEGMENT_SUM_BACKENDS = ["wasm", "cpu"] as const

type Values = Float32Array | Int32Array | Uint8Array

/**
 * out[s, j] = sum over i with ids[i] == s of x[i, j]   (rows viewed as x: [N, inner]).
 * Ids outside [0, numSegments) are dropped, as TensorFlow does.
 */
export const segmentSumInto = (
  x: ArrayLike<number>,
  ids: ArrayLike<number>,
  inner: number,
  numSegments: number,
  out: Values
): Values => {
  out.fill(0)
  const n = ids.length
  for (let i = 0; i < n; i++) {
    const s = ids[i]
    if (s < 0 || s >= numSegments) continue
    const src = i * inner
    const dst = s * inner
    for (let j = 0; j < inner; j++) out[dst + j] += x[src + j]
  }
  return out
}

interface SegmentSumArgs {
  readonly inputs: { readonly x: tf.TensorInfo; readonly segmentIds: tf.TensorInfo }
  readonly attrs: { readonly numSegments: number }
  // The backend types (BackendWasm, MathBackendCPU) are not exported by @tensorflow/tfjs;
  // the few members used are declared structurally below.
  readonly backend: unknown
}

interface WasmLike {
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo
  typedArrayFromHeap(info: tf.TensorInfo): Values
  incRef(dataId: object): void
}
interface CpuLike {
  readSync(dataId: object): Values
  makeTensorInfo(shape: number[], dtype: tf.DataType, values: Values): tf.TensorInfo
}

const outShapeOf = (x: tf.TensorInfo, ids: tf.TensorInfo, numSegments: number) => {
  const idRank = ids.shape.length
  for (let d = 0; d < idRank; d++) {
    if (x.shape[d] !== ids.shape[d]) {
      throw new Error(
        `UnsortedSegmentSum: segmentIds shape [${ids.shape}] must be a prefix of x shape [${x.shape}]`
      )
    }
  }
  const innerShape = x.shape.slice(idRank)
  const inner = innerShape.reduce((a, b) => a * b, 1)
  return { shape: [numSegments, ...innerShape], inner }
}

const newValues = (dtype: tf.DataType, size: number): Values =>
  dtype === "int32" ? new Int32Array(size) : dtype === "bool" ? new Uint8Array(size) : new Float32Array(size)

/** wasm: allocate the output on the heap first (allocation may grow and so detach
 *  earlier heap views), then view inputs and output in place: no copies. */
const segmentSumWasm = (args: SegmentSumArgs): tf.TensorInfo => {
  const { x, segmentIds } = args.inputs
  const { numSegments } = args.attrs
  const backend = args.backend as WasmLike
  const { shape, inner } = outShapeOf(x, segmentIds, numSegments)
  const out = backend.makeOutput(shape, x.dtype)
  const outV = backend.typedArrayFromHeap(out)
  const xV = backend.typedArrayFromHeap(x)
  const idV = backend.typedArrayFromHeap(segmentIds)
  segmentSumInto(xV, idV, inner, numSegments, outV)
  return out
}

const segmentSumCpu = (args: SegmentSumArgs): tf.TensorInfo => {
  const { x, segmentIds } = args.inputs
  const { numSegments } = args.attrs
  const backend = args.backend as CpuLike
  const { shape, inner } = outShapeOf(x, segmentIds, numSegments)
  const outV = newValues(x.dtype, numSegments * inner)
  segmentSumInto(backend.readSync(x.dataId), backend.readSync(segmentIds.dataId), inner, numSegments, outV)
  return backend.makeTensorInfo(shape, x.dtype, outV)
}

/** wasm Identity: a new handle on the same buffer (refcounted, freed with the last). */
const identityShared = (args: { inputs: { x: tf.TensorInfo }; backend: unknown }): tf.TensorInfo => {
  const { x } = args.inputs
  ;(args.backend as WasmLike).incRef(x.dataId)
  return { dataId: x.dataId, shape: x.shape, dtype: x.dtype }
}

/** The stock kernels replaced, kept for what ours do not handle (string tensors, and the
 *  less common shapes and dtypes of Sum and GatherV2). */
const stock = new Map<string, tf.KernelFunc>()
const stockKernel = (name: string, args: unknown): tf.TensorInfo | tf.TensorInfo[] => {
  const f = stock.get(`${name}@wasm`)
  if (f === undefined) throw new Error(`${name}@wasm: no stock kernel to fall back to`)
  return f(args as Parameters<tf.KernelFunc>[0])
}

/** out = x[begin : begin+size] on heap views. Rows of the last axis are contiguous
 *  runs; the leading axes are walked like an odometer. */
const sliceView = (backend: WasmLike, x: tf.TensorInfo, begin: readonly number[], size: readonly number[]): tf.TensorInfo => {
  const out = backend.makeOutput([...size], x.dtype) // before taking views (may grow the heap)
  const n = size.reduce((a, b) => a * b, 1)
  if (n === 0) return out
  const xV = backend.typedArrayFromHeap(x)
  const oV = backend.typedArrayFromHeap(out)
  const r = x.shape.length
  if (r === 0) {
    oV[0] = xV[0]
    return out
  }
  const strides = new Array<number>(r)
  strides[r - 1] = 1
  for (let d = r - 2; d >= 0; d--) strides[d] = strides[d + 1] * x.shape[d + 1]
  // Merge trailing axes taken whole into one contiguous run.
  let inner = r - 1
  while (inner > 0 && size[inner] === x.shape[inner] && begin[inner] === 0) inner--
  const run = size.slice(inner).reduce((a, b) => a * b, 1)
  const idx = new Array<number>(inner).fill(0) // position among the leading axes
  for (let o = 0; o < n; o += run) {
    let src = begin[inner] * strides[inner]
    for (let d = 0; d < inner; d++) src += (begin[d] + idx[d]) * strides[d]
    oV.set(xV.subarray(src, src + run), o)
    for (let d = inner - 1; d >= 0; d--) {
      if (++idx[d] < size[d]) break
      idx[d] = 0
    }
  }
  return out
}

interface SliceArgs {
  readonly inputs: { readonly x: tf.TensorInfo }
  readonly attrs: { readonly begin: number | number[]; readonly size: number | number[] }
  readonly backend: unknown
}
const sliceWasm = (args: SliceArgs): tf.TensorInfo => {
  const { x } = args.inputs
  if (x.dtype === "string") return stockKernel(tf.Slice, args) as tf.TensorInfo
  const [begin, size] = tf.slice_util.parseSliceParams(x as tf.Tensor, args.attrs.begin, args.attrs.size)
  return sliceView(args.backend as WasmLike, x, begin, size)
}

interface SplitVArgs {
  readonly inputs: { readonly x: tf.TensorInfo }
  readonly attrs: { readonly numOrSizeSplits: number | number[]; readonly axis: number }
  readonly backend: unknown
}
const splitVWasm = (args: SplitVArgs): tf.TensorInfo[] => {
  const { x } = args.inputs
  if (x.dtype === "string") return stockKernel(tf.SplitV, args) as tf.TensorInfo[]
  const axis = tf.util.parseAxisParam(args.attrs.axis, x.shape)[0]
  const sizes = tf.backend_util.prepareSplitSize(x as tf.Tensor, args.attrs.numOrSizeSplits, axis)
  const begin = new Array<number>(x.shape.length).fill(0)
  return sizes.map((s) => {
    const size = [...x.shape]
    size[axis] = s
    const part = sliceView(args.backend as WasmLike, x, begin, size)
    begin[axis] += s
    return part
  })
}

interface UnpackArgs {
  readonly inputs: { readonly value: tf.TensorInfo }
  readonly attrs: { readonly axis: number }
  readonly backend: unknown
}
const unpackWasm = (args: UnpackArgs): tf.TensorInfo[] => {
  const x = args.inputs.value
  if (x.dtype === "string") return stockKernel(tf.Unpack, args) as tf.TensorInfo[]
  const axis = args.attrs.axis < 0 ? args.attrs.axis + x.shape.length : args.attrs.axis
  const outShape = x.shape.filter((_, d) => d !== axis)
  const begin = new Array<number>(x.shape.length).fill(0)
  const size = [...x.shape]
  size[axis] = 1
  return Array.from({ length: x.shape[axis] }, (_, i) => {
    begin[axis] = i
    const { dataId, dtype } = sliceView(args.backend as WasmLike, x, begin, size)
    return { dataId, dtype, shape: outShape }
  })
}

interface SumArgs {
  readonly inputs: { readonly x: tf.TensorInfo }
  readonly attrs: { readonly axis: number | number[]; readonly keepDims: boolean }
  readonly backend: unknown
}
const sumWasm = (args: SumArgs): tf.TensorInfo => {
  const { x } = args.inputs
  const axes = tf.util.parseAxisParam(args.attrs.axis, x.shape).sort((p, q) => p - q)
  const leading = axes.length > 0 && axes.length < x.shape.length && axes.every((d, i) => d === i)
  if (x.dtype !== "float32" || !leading) return stockKernel(tf.Sum, args) as tf.TensorInfo
  const backend = args.backend as WasmLike
  const inner = x.shape.slice(axes.length)
  const outShape = args.attrs.keepDims ? [...axes.map(() => 1), ...inner] : inner
  const out = backend.makeOutput(outShape, "float32")
  const xV = backend.typedArrayFromHeap(x)
  const oV = backend.typedArrayFromHeap(out)
  const n = inner.reduce((p, q) => p * q, 1)
  const rows = xV.length / n
  const acc = new Float64Array(n) // float64 accumulation: thousands of rows
  for (let i = 0; i < rows; i++) {
    const row = i * n
    for (let j = 0; j < n; j++) acc[j] += xV[row + j]
  }
  oV.set(acc)
  return out
}

interface GatherArgs {
  readonly inputs: { readonly x: tf.TensorInfo; readonly indices: tf.TensorInfo }
  readonly attrs: { readonly axis: number; readonly batchDims: number }
  readonly backend: unknown
}
/** out[i, ...] = x[indices[i], ...] on heap views, for float32 x, int32 indices, axis 0,
 *  no batch dims (the embedding lookup); anything else goes to the stock kernel. */
const gatherWasm = (args: GatherArgs): tf.TensorInfo => {
  const { x, indices } = args.inputs
  const common =
    x.dtype === "float32" &&
    indices.dtype === "int32" &&
    x.shape.length >= 1 &&
    (args.attrs.batchDims ?? 0) === 0 &&
    tf.util.parseAxisParam(args.attrs.axis, x.shape)[0] === 0
  if (!common) return stockKernel(tf.GatherV2, args) as tf.TensorInfo
  const backend = args.backend as WasmLike
  const rows = x.shape[0]
  const rowShape = x.shape.slice(1)
  const inner = rowShape.reduce((a, b) => a * b, 1)
  // Out-of-range indices throw before anything is allocated, with the message the stock
  // wasm and cpu kernels both throw.
  const n = indices.shape.reduce((a, b) => a * b, 1)
  const checked = backend.typedArrayFromHeap(indices) // dropped: makeOutput may detach it
  for (let i = 0; i < n; i++) {
    const id = checked[i]
    if (!(id >= 0 && id < rows)) throw new Error(`GatherV2: the index value ${id} is not in [0, ${rows - 1}]`)
  }
  const out = backend.makeOutput([...indices.shape, ...rowShape], "float32") // before the views
  if (n === 0 || inner === 0) return out
  const xV = backend.typedArrayFromHeap(x)
  const ids = backend.typedArrayFromHeap(indices)
  const oV = backend.typedArrayFromHeap(out)
  if (inner === 1) {
    for (let i = 0; i < n; i++) oV[i] = xV[ids[i]]
  } else {
    for (let i = 0; i < n; i++) {
      const src = ids[i] * inner
      oV.set(xV.subarray(src, src + inner), i * inner)
    }
  }
  return out
}

const OURS: ReadonlyArray<{ kernelName: string; backendName: string; kernelFunc: tf.KernelFunc }> = [
  ...SEGMENT_SUM_BACKENDS.map((backendName) => ({
    kernelName: tf.UnsortedSegmentSum,
    backendName,
    kernelFunc: (backendName === "wasm" ? segmentSumWasm : segmentSumCpu) as unknown as tf.KernelFunc
  })),
  { kernelName: tf.Identity, backendName: "wasm", kernelFunc: identityShared as unknown as tf.KernelFunc },
  { kernelName: tf.Slice, backendName: "wasm", kernelFunc: sliceWasm as unknown as tf.KernelFunc },
  { kernelName: tf.SplitV, backendName: "wasm", kernelFunc: splitVWasm as unknown as tf.KernelFunc },
  { kernelName: tf.Unpack, backendName: "wasm", kernelFunc: unpackWasm as unknown as tf.KernelFunc },
  { kernelName: tf.Sum, backendName: "wasm", kernelFunc: sumWasm as unknown as tf.KernelFunc },
  { kernelName: tf.GatherV2, backendName: "wasm", kernelFunc: gatherWasm as unknown as tf.KernelFunc }
]

/**
 * Register Flotilla's kernels, replacing stock ones. Idempotent, and safe to call again
 * after a backend package is imported (importing @tensorflow/tfjs-backend-wasm registers
 * its stock kernels, so backend.ts calls this after every backend switch). Returns the
 * kernels, as "Name@backend", for the start-up log.
 */
export const registerKernels = (): readonly string[] => {
  const done: string[] = []
  for (const k of OURS) {
    // A backend's stock kernels are registered when its package is imported; replace
    // them only then (backend.ts calls this again after each backend switch).
    if (tf.findBackendFactory(k.backendName) === null) continue
    done.push(`${k.kernelName}@${k.backendName}`)
    const current = tf.getKernel(k.kernelName, k.backendName)
    if (current?.kernelFunc === k.kernelFunc) continue
    // Unregister first: replacing silently instead of the "already registered" warning.
    // The stock setup/dispose hooks stay, for the stock kernel kept as a fallback.
    if (current !== undefined) {
      stock.set(`${k.kernelName}@${k.backendName}`, current.kernelFunc)
      tf.unregisterKernel(k.kernelName, k.backendName)
    }
    tf.registerKernel({ ...k, setupFunc: current?.setupFunc, disposeFunc: current?.disposeFunc })
  }
  return done
}
