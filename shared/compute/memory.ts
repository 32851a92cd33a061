// Implements: what a training step needs of the wasm backend's heap, checked before a worker
// (or a pipeline stage) starts, and the words for a heap that ran out anyway.
//
// TensorFlow.js's wasm backend has a 32-bit heap: its emscripten glue caps it at
// 4,294,901,760 bytes (4 GiB − 64 KiB). One training step holds about 21.3 bytes of heap
// per parameter (the params, their gradients, the transposes of the backward's matMuls,
// XNNPACK's packed weights), measured by scripts/too-big.ts on GPTs of 100-200M params
// (T 16): a 201.8M-param GPT (16 layers, width 1024) trains with 256 KiB to spare, a
// 214.4M one (17 layers) does not. When the heap runs out, tfjs-backend-wasm does not check
// the failed malloc: it writes at address 0 and then aborts ("Aborted()", or "memory access
// out of bounds" from a later dispose), and the process cannot compute any more. So the
// limit is checked up front from the estimate, refusing steps that would come within 4% of
// it, and an abort is reported in these words.
// Does not own: the backend choice (backend.ts), the models.

/** The wasm backend's heap maximum (its glue's getHeapMax()). */
export const WASM_HEAP_MAX = 4_294_901_760

/** Heap bytes one training step holds per parameter (scripts/too-big.ts). */
export const STEP_BYTES_PER_PARAM = 21.3

/** The share of the heap a step may be estimated to use (near the top, allocation corrupts silently). */
const HEADROOM = 0.96

const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`

/** Estimated heap of one training step: params × STEP_BYTES_PER_PARAM plus the activations. */
export const stepHeapBytes = (params: number, activationBytes: number): number => params * STEP_BYTES_PER_PARAM + activationBytes

/**
 * Activations a GPT step keeps for its backward, roughly: per position and layer, the
 * block's intermediates (about 24 widths) and the attention scores (4 per head and position).
 */
export const gptActivationBytes = (m: { readonly contextLength: number; readonly width: number; readonly heads: number }, layers: number, rows: number): number =>
  4 * rows * m.contextLength * layers * (24 * m.width + 4 * m.heads * m.contextLength)

/** Why `what` cannot train in one wasm process, or undefined when it fits. */
export const wasmHeapProblem = (what: string, params: number, activationBytes: number): string | undefined => {
  const need = stepHeapBytes(params, activationBytes)
  if (need <= HEADROOM * WASM_HEAP_MAX) return undefined
  return (
    `${what}: ${(params / 1e6).toFixed(1)}M params need about ${gib(need)} of wasm heap for one training step ` +
    `(${STEP_BYTES_PER_PARAM} bytes per param, measured, plus ${gib(activationBytes)} of activations); the wasm backend's heap is at most ${gib(WASM_HEAP_MAX)}, ` +
    `so this model does not fit one worker. Cut it into pipeline stages (topology.stages: S, or flotilla up --stages S: each stage worker holds 1/S of it), ` +
    `or train on the tensorflow backend (@tensorflow/tfjs-node-gpu), whose memory is the device's`
  )
}

/** A wasm abort (the heap ran out mid-step), in words; undefined for any other error. */
export const explainWasmAbort = (e: unknown): string | undefined => {
  const m = e instanceof Error ? e.message : String(e)
  if (!/Aborted\(\)|memory access out of bounds/.test(m)) return undefined
  return `the wasm backend aborted (${m.split("\n")[0]}): its heap (at most ${gib(WASM_HEAP_MAX)}) ran out during a step, and this process cannot compute any more. Use pipeline stages (topology.stages) or a smaller batch`
}
