import * as tf from "@tensorflow/tfjs"
import { initBackend } from "./shared/compute/backend.ts"
import { makeGpt, gptMini } from "./shared/models/gpt.ts"
import { lossAndGrads } from "./shared/models/model.ts"
await initBackend("wasm")
if (process.argv[2] === "share") {
  tf.unregisterKernel("Identity", "wasm")
  tf.registerKernel({ kernelName: "Identity", backendName: "wasm", kernelFunc: ({ inputs, backend }: any) => { backend.incRef(inputs.x.dataId); return { dataId: inputs.x.dataId, shape: inputs.x.shape, dtype: inputs.x.dtype } } })
}
const def = makeGpt(gptMini)
const params = def.init(1)
const B = 32, T = 128
const tokens = new Int32Array(B * (T + 1)).map((_, i) => (i * 7919) % 256)
let g0: Float32Array | undefined
for (let i = 0; i < 4; i++) {
  const c = process.cpuUsage(); const t = performance.now()
  const r = lossAndGrads(def, params, { tokens, batchSize: B, seqLen: T })
  const cu = process.cpuUsage(c)
  g0 = r.grads.get("h.1.attn.c_attn.weight")
  console.log(process.argv[2], "step wall", (performance.now() - t).toFixed(0), "cpu user", (cu.user / 1000).toFixed(0), "sys", (cu.system / 1000).toFixed(0), "heapMB", ((tf.backend() as any).wasm.HEAPU8.length / 1e6).toFixed(0), r.loss)
}
console.log(g0!.slice(0, 4))
