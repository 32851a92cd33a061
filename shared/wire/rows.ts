// Implements: the row-sparse wire form of a gradient: a 2-D gradient whose rows are mostly
// zero (an embedding's: only the rows of the batch's tokens are touched, ~15% of the seed
// classifier's 10,000 words per batch) travels as its non-zero rows `name` [k, C] and their
// indices `name@rows` int32 [k], ascending; the receiver scatters them back into a dense
// [R, C] of zeros. The maths is unchanged (the optimizer sees the same dense gradient), only
// the bytes shrink. Used for f32 gradients (an int8 codec's error feedback is per dense
// tensor). Pure. Does not own: the bundle layout (tensor.ts), quantization (codecs.ts).
import { decodeTensor } from "./codecs.ts"
import type { WireTensor } from "./tensor.ts"

export const ROWS_SUFFIX = "@rows"

/** At most this share of rows non-zero (and at least this many rows) for the sparse form to pay. */
const MAX_DENSITY = 0.5
const MIN_ROWS = 8

/** `data` [R, C] as sparse rows, or undefined when dense is as small. */
export const toSparseRows = (name: string, shape: readonly number[], data: Float32Array): WireTensor[] | undefined => {
  if (shape.length !== 2 || shape[0] < MIN_ROWS) return undefined
  const [R, C] = shape
  const rows: number[] = []
  for (let r = 0; r < R; r++) {
    for (let c = r * C, end = c + C; c < end; c++) {
      if (data[c] !== 0) {
        rows.push(r)
        break
      }
    }
    if (rows.length > R * MAX_DENSITY) return undefined
  }
  const values = new Float32Array(rows.length * C)
  rows.forEach((r, i) => values.set(data.subarray(r * C, (r + 1) * C), i * C))
  return [
    { name, dtype: "float32", shape: [rows.length, C], data: values },
    { name: name + ROWS_SUFFIX, dtype: "int32", shape: [rows.length], data: Int32Array.from(rows) }
  ]
}

/**
 * A received bundle's tensors as dense float32 arrays by name: `X` + `X@rows` become the
 * dense X of `shapeOf(X)`. Returns the reason when the pair does not describe one (rows
 * out of range, not ascending, a count that does not match, a row width that differs).
 */
export const denseGrads = (
  tensors: ReadonlyArray<{ readonly name: string; readonly shape: ReadonlyArray<number>; readonly values: Float32Array | Int32Array }>,
  shapeOf: (name: string) => readonly number[] | undefined
): { readonly grads: Map<string, Float32Array> } | { readonly problem: string } => {
  const byName = new Map(tensors.map((t) => [t.name, t]))
  const grads = new Map<string, Float32Array>()
  for (const t of tensors) {
    if (t.name.endsWith(ROWS_SUFFIX)) {
      if (!byName.has(t.name.slice(0, -ROWS_SUFFIX.length))) return { problem: `${t.name} comes without ${t.name.slice(0, -ROWS_SUFFIX.length)}` }
      continue
    }
    const idx = byName.get(t.name + ROWS_SUFFIX)
    if (idx === undefined) {
      if (!(t.values instanceof Float32Array)) return { problem: `gradient ${t.name} is not float32` }
      // the model's shape exactly (not only its element count): a reshaped tensor is another tensor
      const want = shapeOf(t.name)
      if (want !== undefined && (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i]))) return { problem: `gradient ${t.name} has shape [${t.shape}], the model's is [${want}]` }
      grads.set(t.name, t.values)
      continue
    }
    const shape = shapeOf(t.name)
    if (!shape || shape.length !== 2) return { problem: `${t.name} is sent as rows but the shard holds no 2-D tensor of that name` }
    const [R, C] = shape
    const rows = idx.values
    if (!(rows instanceof Int32Array) || !(t.values instanceof Float32Array)) return { problem: `${t.name}: rows must be int32 and values float32` }
    if (t.shape.length !== 2 || t.shape[1] !== C || t.shape[0] !== rows.length) {
      return { problem: `${t.name}: ${rows.length} rows of [${t.shape}] do not fit [${R}, ${C}]` }
    }
    const dense = new Float32Array(R * C)
    let prev = -1
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i]
      if (!(r > prev && r < R)) return { problem: `${t.name}${ROWS_SUFFIX}[${i}] = ${r}: rows must ascend within [0, ${R})` }
      dense.set(t.values.subarray(i * C, (i + 1) * C), r * C)
      prev = r
    }
    grads.set(t.name, dense)
  }
  return { grads }
}

/**
 * A gradient bundle's wire tensors as dense float32 gradients: every codec of the registry
 * decoded (codecs.ts decodeTensor), the row-sparse ones scattered (denseGrads); what does not
 * fit as `problem` — `decode` when a tensor itself would not decode.
 */
export const denseOfWire = (
  tensors: ReadonlyArray<WireTensor>,
  shapeOf: (name: string) => readonly number[] | undefined
): { readonly grads: Map<string, Float32Array> } | { readonly problem: string; readonly decode?: true } => {
  try {
    return denseGrads(tensors.map((t) => ({ name: t.name, shape: t.shape, values: t.dtype === "int32" ? (t.data as Int32Array) : decodeTensor(t) })), shapeOf)
  } catch (err) {
    return { problem: (err as Error).message, decode: true }
  }
}
