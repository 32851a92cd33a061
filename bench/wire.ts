// Implements: the tensor wire benchmark — raw `nats` publishes of a bundle's bytes versus
// sendBundle/receiveBundles of the same bundle, side by side in one run, for a gpt-mini
// sized float32 gradient bundle (0.88 M floats in 53 tensors, ≈ 3.5 MB) and its int8
// block-quantized form (≈ 0.89 MB). Goal (the wire issue): wire ≥ 0.8 × raw throughput.
// Also, first, a codec table: encode (plain and with error feedback) and decode ms per 1M
// floats for every codec of shared/wire/codecs.ts, with its bytes vs f32 (best of 15, one
// core, in this process).
// Run: node bench/wire.ts [--bundles 32] [--reps 7] [--window 4] [--owned]
//      node bench/wire.ts --codecs        (the codec table only, no NATS)
//   uses $NATS_URL if set, else starts a local nats-server (shared/bus/local-server.ts,
//   default max_payload 1 MiB, so both paths send 1 MiB-ish messages).
// Does not own: the wire format (shared/wire/), the bus (shared/bus/).
//
// Method: the publisher is this process, the subscriber a child process (its own NATS
// connection and event loop), as in PERF-NOTES. Per repetition the publisher streams
// `bundles` bundles with at most `window` bundles unacknowledged (the child acks each
// complete bundle over IPC), so server-side buffers stay bounded. Time runs from the first
// publish to the last ack. Raw: the payload cut into ≤ max_payload − 8 KiB pieces, no
// headers, the subscriber only counts bytes (the ideal). Wire: encode (one copy) + frame +
// CRC + headers on the sender, reassemble (one copy) + CRC + decode (views) on the
// receiver, which uses `borrow` (the consumer only counts bundles; a parameter server
// adding gradients into its accumulators is the same case); `--owned` measures the default
// mode instead, a fresh buffer per bundle. One warm-up repetition per mode is discarded;
// medians are printed.
import { fork } from "node:child_process"
import type { ChildProcess } from "node:child_process"
import { connect } from "nats"
import type { NatsConnection, Subscription as NatsSub } from "nats"
import { Effect, Exit, ManagedRuntime, Scope } from "effect"
import { Bus } from "../shared/bus/Bus.ts"
import type { BusShape } from "../shared/bus/Bus.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { Result } from "effect"
import { decodeTensor, encodedBytes, encodeTensor, parseCodec } from "../shared/wire/codecs.ts"
import { DEFAULT_HEADROOM, frameMessage, headerBytes } from "../shared/wire/frames.ts"
import { encodeBundle, manifestToJson } from "../shared/wire/tensor.ts"
import type { TensorBundle, WireTensor } from "../shared/wire/tensor.ts"
import { receiveBundles, sendBundle } from "../shared/wire/transport.ts"

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 ? Number(process.argv[i + 1]) : dflt
}

// ---------------------------------------------------------------------------------------
// Child: the subscriber.

type ToChild = { cmd: "raw" | "wire"; subject: string; ackBytes: number } | { cmd: "stop" } | { cmd: "exit" }
type FromChild = { ev: "ready" } | { ev: "ack" } | { ev: "stopped"; cpuMs: number }

const cpuMs = (since?: NodeJS.CpuUsage) => {
  const u = process.cpuUsage(since)
  return (u.user + u.system) / 1000
}

const child = async (url: string) => {
  const send = (m: FromChild) => process.send!(m)
  const nc = await connect({ servers: url, name: "bench-wire-sub" })
  const runtime = ManagedRuntime.make(NatsBus.layer({ servers: url, name: "bench-wire-sub-bus" }))
  const bus = await runtime.runPromise(Effect.gen(function*() { return yield* Bus }))
  let stop: () => Promise<void> = async () => {}
  let cpu0 = process.cpuUsage()
  process.on("message", async (m: ToChild) => {
    if (m.cmd === "raw" || m.cmd === "wire") cpu0 = process.cpuUsage()
    if (m.cmd === "raw") {
      let got = 0
      const sub: NatsSub = nc.subscribe(m.subject, {
        callback: (_err, msg) => {
          got += msg.data.length
          while (got >= m.ackBytes) {
            got -= m.ackBytes
            send({ ev: "ack" })
          }
        }
      })
      await nc.flush()
      stop = async () => {
        sub.unsubscribe()
        await nc.flush()
      }
    } else if (m.cmd === "wire") {
      const scope = Scope.makeUnsafe()
      await runtime.runPromise(
        receiveBundles(bus, m.subject, () => Effect.sync(() => send({ ev: "ack" })), {
          borrow: !process.argv.includes("--owned"),
          onError: (e) => Effect.sync(() => console.error(`child: wire error ${e.reason}: ${e.message}`))
        }).pipe(Effect.andThen(bus.flush()), Scope.provide(scope))
      )
      stop = () => runtime.runPromise(Scope.close(scope, Exit.void))
    } else if (m.cmd === "stop") {
      await stop()
      send({ ev: "stopped", cpuMs: cpuMs(cpu0) })
      return
    } else {
      await nc.close()
      await runtime.dispose()
      process.exit(0)
    }
    send({ ev: "ready" })
  })
  send({ ev: "ready" })
}

// ---------------------------------------------------------------------------------------
// Parent: workloads and the publisher.

/** gpt-mini (vocab 256, context 128, 4 layers, width 128, MLP 4×, untied head) gradients. */
const gptMiniGrads = (): Array<{ name: string; shape: Array<number> }> => {
  const C = 128
  const out = [
    { name: "wte", shape: [256, C] },
    { name: "wpe", shape: [128, C] }
  ]
  for (let l = 0; l < 4; l++) {
    const p = `h.${l}.`
    out.push(
      { name: p + "ln1.g", shape: [C] }, { name: p + "ln1.b", shape: [C] },
      { name: p + "attn.qkv.w", shape: [C, 3 * C] }, { name: p + "attn.qkv.b", shape: [3 * C] },
      { name: p + "attn.proj.w", shape: [C, C] }, { name: p + "attn.proj.b", shape: [C] },
      { name: p + "ln2.g", shape: [C] }, { name: p + "ln2.b", shape: [C] },
      { name: p + "mlp.fc.w", shape: [C, 4 * C] }, { name: p + "mlp.fc.b", shape: [4 * C] },
      { name: p + "mlp.proj.w", shape: [4 * C, C] }, { name: p + "mlp.proj.b", shape: [C] }
    )
  }
  out.push({ name: "lnf.g", shape: [C] }, { name: "lnf.b", shape: [C] }, { name: "lm_head", shape: [C, 256] })
  return out
}

const makeBundles = () => {
  const specs = gptMiniGrads()
  let s = 1
  const f32: Array<WireTensor> = specs.map(({ name, shape }) => {
    const n = shape.reduce((a, b) => a * b, 1)
    const data = new Float32Array(n)
    for (let i = 0; i < n; i++) data[i] = ((s = (s * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff - 0.5) * 1e-2
    return { name, dtype: "float32", shape, data }
  })
  const meta = { kind: "grads", job: "bench", version: 1, step: 1, sender: "bench-w0" }
  const t0 = performance.now()
  const int8 = Result.getOrThrow(parseCodec("int8"))
  const q: Array<WireTensor> = f32.map((t) => encodeTensor(int8, t.name, t.shape, t.data as Float32Array))
  const quantMs = performance.now() - t0
  const numel = f32.reduce((a, t) => a + t.data.length, 0)
  return {
    numel,
    quantMs,
    f32: { meta: { ...meta, codec: "f32" }, tensors: f32 } as TensorBundle,
    int8: { meta: { ...meta, codec: "int8" }, tensors: q } as TensorBundle
  }
}

/** encode / encode with error feedback / decode ms per 1M floats of every codec, best of 15. */
const codecTable = () => {
  const n = 1 << 20
  let s = 7
  const x = new Float32Array(n)
  for (let i = 0; i < n; i++) x[i] = ((s = (s * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff - 0.5) * 1e-2
  console.log(`codecs, per ${n} floats (best of 15):`)
  console.log(`${"codec".padEnd(10)} ${"encode ms".padStart(10)} ${"with EF ms".padStart(11)} ${"decode ms".padStart(10)} ${"bytes".padStart(9)} ${"vs f32".padStart(7)}`)
  for (const name of ["f32", "bf16", "int8", "int4", "sign1", "topk:0.01", "topk:0.1"]) {
    const c = Result.getOrThrow(parseCodec(name))
    const residual = new Float32Array(n)
    const out = new Float32Array(n)
    let [enc, ef, dec] = [Infinity, Infinity, Infinity]
    for (let rep = 0; rep < 15; rep++) {
      let t0 = performance.now()
      const w = encodeTensor(c, "g", [n], x)
      enc = Math.min(enc, performance.now() - t0)
      t0 = performance.now()
      encodeTensor(c, "g", [n], x, residual)
      ef = Math.min(ef, performance.now() - t0)
      t0 = performance.now()
      decodeTensor(w, out)
      dec = Math.min(dec, performance.now() - t0)
    }
    const bytes = encodedBytes(c, n)
    console.log(`${name.padEnd(10)} ${enc.toFixed(2).padStart(10)} ${ef.toFixed(2).padStart(11)} ${dec.toFixed(2).padStart(10)} ${String(bytes).padStart(9)} ${((4 * n) / bytes).toFixed(1).padStart(6)}×`)
  }
  console.log("")
}

const median = (xs: Array<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const main = async () => {
  codecTable()
  if (process.argv.includes("--codecs")) return
  const bundles = arg("bundles", 32)
  const reps = arg("reps", 7)
  const window = arg("window", 4)
  const server = process.env["NATS_URL"] ? undefined : await startLocalNatsServer({ port: 0 })
  const url = process.env["NATS_URL"] || server!.url
  const owned = process.argv.includes("--owned")
  const kid: ChildProcess = fork(import.meta.filename, ["--child", url, ...(owned ? ["--owned"] : [])], { stdio: ["ignore", "inherit", "inherit", "ipc"] })
  const kidReady = new Promise<void>((resolve) => kid.once("message", () => resolve())) // its first message is "ready"
  const nc: NatsConnection = await connect({ servers: url, name: "bench-wire-pub" })
  const runtime = ManagedRuntime.make(NatsBus.layer({ servers: url, name: "bench-wire-pub-bus" }))
  const bus: BusShape = await runtime.runPromise(Effect.gen(function*() { return yield* Bus }))
  const maxPayload = bus.maxPayload

  // IPC: acks and ready/stopped events from the child.
  let acks = 0
  let waiters: Array<{ n: number; resolve: () => void }> = []
  let nextEvent: ((e: FromChild) => void) | undefined
  let childCpuMs = 0
  kid.on("message", (e: FromChild) => {
    if (e.ev === "ack") {
      acks++
      waiters = waiters.filter((w) => (acks >= w.n ? (w.resolve(), false) : true))
    } else {
      if (e.ev === "stopped") childCpuMs = e.cpuMs
      nextEvent?.(e)
    }
  })
  const event = (ev: FromChild["ev"]) => new Promise<void>((resolve) => (nextEvent = (e) => e.ev === ev && resolve()))
  const acked = (n: number) => (acks >= n ? Promise.resolve() : new Promise<void>((resolve) => waiters.push({ n, resolve })))
  const tell = async (m: ToChild, until: FromChild["ev"]) => {
    const p = event(until)
    kid.send(m)
    await p
  }
  await kidReady

  const { numel, quantMs, f32, int8 } = makeBundles()
  console.log(`bench/wire: NATS ${url} (max_payload ${maxPayload} B), subscriber in a child process`)
  console.log(`workload: gpt-mini grads, ${f32.tensors.length} tensors, ${numel} floats; ` +
    `${bundles} bundles per repetition, window ${window}, ${reps} repetitions (+1 warm-up)`)
  console.log(`int8 block-256 quantize of the bundle: ${quantMs.toFixed(1)} ms (first call, cold); receiver mode: ${owned ? "owned" : "borrow"}`)

  type Row = { workload: string; path: string; mbs: Array<number>; sendCpu: Array<number>; recvCpu: Array<number>; payload: number; msgs: number; wireBytes: number }
  const rows: Array<Row> = []

  const runRep = async (path: "raw" | "wire", bundle: TensorBundle, pieces: Array<Uint8Array>) => {
    const subject = `bench.wire.${path}.${Math.random().toString(36).slice(2, 8)}`
    const payloadBytes = pieces.reduce((a, p) => a + p.length, 0)
    await tell({ cmd: path, subject, ackBytes: payloadBytes }, "ready")
    acks = 0
    const cpu0 = process.cpuUsage()
    const t0 = performance.now()
    for (let i = 0; i < bundles; i++) {
      if (i >= window) await acked(i - window + 1)
      if (path === "raw") for (const p of pieces) nc.publish(subject, p)
      else await runtime.runPromise(sendBundle(bus, subject, bundle))
    }
    await acked(bundles)
    const ms = performance.now() - t0
    const sendCpu = cpuMs(cpu0) / bundles
    await tell({ cmd: "stop" }, "stopped")
    return { mbs: (payloadBytes * bundles) / 1e6 / (ms / 1000), sendCpu, recvCpu: childCpuMs / bundles }
  }

  for (const [workload, bundle] of [["f32 (3.5 MB)", f32], ["int8 (0.9 MB)", int8]] as const) {
    const { manifest, payload } = Effect.runSync(Effect.fromResult(encodeBundle(bundle)))
    const frames = Effect.runSync(Effect.fromResult(frameMessage(payload, { id: "bench-w0-x-0", maxPayload, manifest: manifestToJson(manifest) })))
    const piece = maxPayload - DEFAULT_HEADROOM
    const pieces: Array<Uint8Array> = []
    for (let o = 0; o < payload.length; o += piece) pieces.push(payload.subarray(o, Math.min(o + piece, payload.length)))
    const wireBytes = frames.reduce((a, f) => a + f.data.length + headerBytes(f.headers), 0)
    const raw: Row = { workload, path: "raw nats", mbs: [], sendCpu: [], recvCpu: [], payload: payload.length, msgs: pieces.length, wireBytes: payload.length }
    const wire: Row = { workload, path: "wire", mbs: [], sendCpu: [], recvCpu: [], payload: payload.length, msgs: frames.length, wireBytes }
    for (let r = 0; r <= reps; r++) {
      // alternate raw and wire so drift on a shared machine hits both alike
      const a = await runRep("raw", bundle, pieces)
      const b = await runRep("wire", bundle, pieces)
      if (r > 0) {
        for (const [row, x] of [[raw, a], [wire, b]] as const) {
          row.mbs.push(x.mbs)
          row.sendCpu.push(x.sendCpu)
          row.recvCpu.push(x.recvCpu)
        }
      }
    }
    rows.push(raw, wire)
  }

  const pad = (s: string, n: number) => s.padEnd(n)
  const lpad = (s: string, n: number) => s.padStart(n)
  console.log("")
  console.log(`${pad("workload", 20)} ${pad("path", 9)} ${lpad("MB/s med", 9)} ${lpad("(min–max)", 11)} ${lpad("bundles/s", 10)} ${lpad("msgs/s", 7)} ${lpad("wire/raw", 9)} ${lpad("CPU ms/bundle send|recv", 24)} ${lpad("bytes on wire/bundle", 21)}`)
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i]
    const med = median(r.mbs)
    const bps = (med * 1e6) / r.payload
    const ratio = r.path === "wire" ? (med / median(rows[i - 1].mbs)).toFixed(2) : "1.00"
    const over = r.path === "wire" ? ` (+${(((r.wireBytes - r.payload) / r.payload) * 100).toFixed(2)}%)` : ""
    console.log(
      `${pad(r.workload, 20)} ${pad(r.path, 9)} ${lpad(med.toFixed(0), 9)} ${lpad(`${Math.min(...r.mbs).toFixed(0)}–${Math.max(...r.mbs).toFixed(0)}`, 11)} ` +
        `${lpad(bps.toFixed(1), 10)} ${lpad((bps * r.msgs).toFixed(0), 7)} ${lpad(ratio, 9)} ${lpad(`${median(r.sendCpu).toFixed(2)} | ${median(r.recvCpu).toFixed(2)}`, 24)} ${lpad(`${r.wireBytes}${over}`, 21)}`
    )
  }
  console.log("\nMB/s counts payload bytes (10^6 B/s); msgs/s counts NATS messages; CPU ms/bundle is user+sys of the")
  console.log("publisher (this process) and the subscriber (child) per bundle, medians. Goal: wire/raw ≥ 0.80.")

  await tell({ cmd: "stop" }, "stopped").catch(() => {})
  kid.send({ cmd: "exit" })
  await nc.close()
  await runtime.dispose()
  await server?.stop()
}

const ci = process.argv.indexOf("--child")
if (ci >= 0) await child(process.argv[ci + 1])
else await main()
