// Implements: the first codec entry points, kept as thin wrappers over the codec registry
// (codecs.ts) while their callers move to it: `toWire` / `fromWire` between plain
// Float32Arrays and WireTensors under a codec name, and the int8 kernels `quantize` /
// `dequantize`.
// Does not own: any codec or its error feedback (codecs.ts), the payload layout (tensor.ts).

import { Result } from "effect"
import { decodeTensor, encodeTensor, parseCodec } from "./codecs.ts"
import type { Codec, WireTensor } from "./tensor.ts"

export { DEFAULT_BLOCK_SIZE, dequantize, quantize } from "./codecs.ts"
export type { Quantized } from "./codecs.ts"

export interface ToWireOptions {
  /** Error-feedback residual for this tensor, updated in place (codecs.ts encodeTensor). */
  readonly residual?: Float32Array
  /** Elements per scale, for the block codecs (int8, int4, sign1). */
  readonly blockSize?: number
}

/** A float32 tensor as it goes on the wire under the codec named `codec` ("f32" shares `data`, no copy). */
export const toWire = (
  name: string,
  shape: ReadonlyArray<number>,
  data: Float32Array,
  codec: Codec,
  opts: ToWireOptions = {}
): WireTensor => {
  const spec = parseCodec(codec)
  if (Result.isFailure(spec)) throw new RangeError(spec.failure)
  const c = opts.blockSize !== undefined ? { ...spec.success, blockSize: opts.blockSize } : spec.success
  return encodeTensor(c, name, shape, data, opts.residual)
}

/** The float32 values of a wire tensor, whatever its codec (codecs.ts decodeTensor). */
export const fromWire = (t: WireTensor, out?: Float32Array): Float32Array => decodeTensor(t, out)
