// Measures which GPT is too big to train in ONE TensorFlow.js wasm worker process: the wasm
// backend has a 32-bit heap, so a training step (`lossAndGrads` of shared/models/model.ts)
// of a large enough model cannot get the memory it needs.
//
// It prints (1) the wasm heap maximum (from the package's .wasm memory section, its
// emscripten glue's getHeapMax(), and a child that mallocs until malloc fails), (2) a table
// of candidate GPTs (contextLength 16, vocab 256, batch 1 or 2, width 1024-2048), each run
// as init + one lossAndGrads in a fresh child process, one at a time: params, param bytes,
// ok/fail, the error, step wall time, peak RSS, the heap size after the step and the peak
// tensor bytes the step held, and (3) a coarse binary search on layers at width 1024 for the
// largest GPT that works and the smallest that fails.
//
// A failed allocation is detected by wrapping the backend's `wasm._malloc`: tfjs-backend-wasm
// does not check its result, so a failed malloc (it returns 0) is otherwise silent. "peak
// tensors" counts only those JS-side allocations (tensor buffers); the heap column also holds
// what the wasm code allocates itself (XNNPACK's packed copy of every matMul right operand).
//
// Run (Node >= 22.18 runs TypeScript natively, no tsx needed; ~6 minutes on 2 cores, peak
// RSS of a child ~5.5 GiB):
//   node scripts/too-big.ts                       # everything
//   node scripts/too-big.ts --one '{"layers":8,"width":1024,"heads":16}'   # one config, prints a RESULT line
//   node scripts/too-big.ts --probe-heap          # the malloc-until-failure probe alone
// Options: --no-search (table only), --timeout-s N (per child, default 240).

import { spawnSync } from "node:child_process"
import fs from "node:fs"
import { createRequire } from "node:module"
import path from "node:path"
import { fileURLToPath } from "node:url"

interface Cand {
  readonly vocabSize: number
  readonly contextLength: number
  readonly layers: number
  readonly heads: number
  readonly width: number
  /** batch rows */
  readonly B: number
}

interface Result {
  readonly config: Cand
  readonly params: number
  readonly paramBytes: number
  readonly ok: boolean
  /** "oom" when a wasm malloc failed (whatever happened afterwards), "error", "crash", "timeout" */
  readonly failure?: string
  readonly error?: string
  /** where the exception came from (top frames) */
  readonly stack?: string
  readonly initMs?: number
  readonly stepMs?: number
  readonly maxRssBytes?: number
  /** wasm heap (HEAPU8.length) after the step: its high-water mark, it never shrinks */
  readonly heapBytes?: number
  /** peak bytes of live tensor allocations in the heap during the step (own malloc/free accounting) */
  readonly peakLiveBytes?: number
  /** failed mallocs: count, the first one's size and the live bytes when it failed */
  readonly failedMallocs?: number
  readonly firstFailedBytes?: number
  readonly liveAtFirstFail?: number
  readonly loss?: number
  readonly gradsFinite?: boolean
  readonly tensorsLeft?: number
}

const SELF = fileURLToPath(import.meta.url)
const argv = process.argv.slice(2)
const flag = (name: string): string | undefined => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv[i + 1] : undefined
}

const defaults = { vocabSize: 256, contextLength: 16, B: 1 }
const cand = (c: Partial<Cand> & Pick<Cand, "layers" | "width" | "heads">): Cand => ({ ...defaults, ...c })

/** GPT parameter count (shared/models/gpt.ts gptSpecs): wte, wpe, 12C²+13C per block, ln_f. */
const paramCount = (c: Cand): number =>
  c.vocabSize * c.width + c.contextLength * c.width + c.layers * (12 * c.width * c.width + 13 * c.width) + 2 * c.width

const GiB = 2 ** 30
const gib = (n: number | undefined): string => (n === undefined ? "-" : (n / GiB).toFixed(2))

// ------------------------------------------------------------------ child: one config

const runOne = async (c: Cand): Promise<Result> => {
  const tf = await import("@tensorflow/tfjs")
  const { initBackend } = await import("../shared/compute/backend.ts")
  const { makeModel } = await import("../shared/models/zoo.ts")
  const { lossAndGrads, countParams } = await import("../shared/models/model.ts")
  await initBackend("wasm")
  const wasm = (tf.backend() as unknown as { wasm: { _malloc: (n: number) => number; _free: (p: number) => void; HEAPU8: Uint8Array } }).wasm

  // Observe the backend's allocations (it calls this.wasm._malloc / _free at call time).
  const sizes = new Map<number, number>()
  let live = 0
  let peakLive = 0
  let failed = 0
  let firstFailedBytes: number | undefined
  let liveAtFirstFail: number | undefined
  // emscripten's Module._malloc/_free replace themselves with the raw export on first
  // call: call them once so that the wrappers below are not overwritten.
  wasm._free(wasm._malloc(16))
  const malloc = wasm._malloc.bind(wasm)
  const free = wasm._free.bind(wasm)
  wasm._malloc = (n: number): number => {
    const p = malloc(n) >>> 0
    if (p === 0 && n > 0) {
      failed++
      if (firstFailedBytes === undefined) {
        firstFailedBytes = n
        liveAtFirstFail = live
      }
    } else {
      sizes.set(p, n)
      live += n
      if (live > peakLive) peakLive = live
    }
    return p
  }
  wasm._free = (p: number): void => {
    const n = sizes.get(p >>> 0)
    if (n !== undefined) {
      live -= n
      sizes.delete(p >>> 0)
    }
    free(p)
  }

  const model = makeModel({ kind: "gpt", vocabSize: c.vocabSize, contextLength: c.contextLength, layers: c.layers, heads: c.heads, width: c.width })
  const params = countParams(model)
  const base = { config: c, params, paramBytes: params * 4 }
  const t0 = performance.now()
  const p = model.init(1)
  const initMs = performance.now() - t0
  const tokens = new Int32Array(c.B * (c.contextLength + 1))
  for (let i = 0; i < tokens.length; i++) tokens[i] = (i * 37 + 11) % c.vocabSize
  const batch = { size: c.B, tensors: new Map([["tokens", tokens]]) }
  const stats = () => ({
    initMs,
    maxRssBytes: process.resourceUsage().maxRSS * 1024,
    heapBytes: wasm.HEAPU8.length,
    peakLiveBytes: peakLive,
    failedMallocs: failed,
    ...(firstFailedBytes !== undefined ? { firstFailedBytes, liveAtFirstFail } : {})
  })
  const t1 = performance.now()
  try {
    const { loss, grads } = lossAndGrads(model, p, batch)
    const stepMs = performance.now() - t1
    let finite = true
    for (const g of grads.values()) {
      for (let i = 0; i < g.length; i += 997) if (!Number.isFinite(g[i])) { finite = false; break }
      if (!finite) break
    }
    const sane = Number.isFinite(loss) && finite
    return {
      ...base, ...stats(), stepMs, loss, gradsFinite: finite, tensorsLeft: tf.memory().numTensors,
      ok: failed === 0 && sane,
      ...(failed > 0
        ? { failure: "oom", error: `no exception: ${failed} wasm malloc(s) returned 0 (first ${firstFailedBytes} bytes); loss ${loss}${sane ? "" : ", non-finite"}` }
        : sane ? {} : { failure: "error", error: `non-finite loss or gradients (loss ${loss})` })
    }
  } catch (e) {
    const stepMs = performance.now() - t1
    const error = e instanceof Error ? `${e.name}: ${e.message}` : String(e)
    const stack = e instanceof Error ? (e.stack ?? "").split("\n").slice(1, 9).map((l) => l.trim().replace(/^at /, "")).join(" < ") : undefined
    return { ...base, ...stats(), stepMs, ok: false, failure: failed > 0 ? "oom" : "error", error, stack }
  }
}

// ------------------------------------------------------------------ child: heap probe

const probeHeap = async (): Promise<{ heapMax: number; mallocedBytes: number; blocksPastHeapEnd: number }> => {
  const tf = await import("@tensorflow/tfjs")
  const { initBackend } = await import("../shared/compute/backend.ts")
  await initBackend("wasm")
  const wasm = (tf.backend() as unknown as { wasm: { _malloc: (n: number) => number; _free: (p: number) => void; HEAPU8: Uint8Array } }).wasm
  // Allocations are not touched, so the pages stay virtual: this costs no RSS.
  const ptrs: number[] = []
  let total = 0
  let beyond = 0 // blocks malloc handed out that end past the heap (a 32-bit wrap in sbrk)
  for (const chunk of [256 * 2 ** 20, 16 * 2 ** 20, 2 ** 20, 65536]) {
    for (;;) {
      const p = wasm._malloc(chunk) >>> 0
      if (p === 0) break
      ptrs.push(p)
      total += chunk
      if (p + chunk > wasm.HEAPU8.length) beyond++
    }
  }
  const heapMax = wasm.HEAPU8.length
  for (const p of ptrs) wasm._free(p)
  return { heapMax, mallocedBytes: total, blocksPastHeapEnd: beyond }
}

// ------------------------------------------------------------------ parent

/** Maximum memory of each .wasm the package ships, from its memory section/import (pages × 64 KiB). */
const wasmDeclaredMax = (): Record<string, number | undefined> => {
  const dist = path.dirname(createRequire(import.meta.url).resolve("@tensorflow/tfjs-backend-wasm"))
  const out: Record<string, number | undefined> = {}
  for (const f of fs.readdirSync(dist).filter((f) => f.endsWith(".wasm"))) {
    const b = fs.readFileSync(path.join(dist, f))
    let p = 8
    const leb = (): number => {
      let r = 0, s = 0, x: number
      do { x = b[p++]; r += (x & 0x7f) * 2 ** s; s += 7 } while (x & 0x80)
      return r
    }
    const skipName = (): void => { const n = leb(); p += n }
    const limits = (): number | undefined => { const fl = b[p++]; leb(); return fl & 1 ? leb() * 65536 : undefined }
    while (p < b.length) {
      const id = b[p++]
      const size = leb()
      const end = p + size
      if (id === 2) { // imports: the threaded build imports its (shared) memory
        const n = leb()
        for (let i = 0; i < n; i++) {
          skipName(); skipName()
          const kind = b[p++]
          if (kind === 0) leb()
          else if (kind === 1) { p++; limits() }
          else if (kind === 2) out[f] = limits()
          else if (kind === 3) p += 2
        }
      } else if (id === 5) { out[f] = (leb(), limits()) }
      p = end
    }
  }
  return out
}

/** `function getHeapMax() { return N; }` in the emscripten glue Node loads. */
const glueHeapMax = (): number[] => {
  const main = createRequire(import.meta.url).resolve("@tensorflow/tfjs-backend-wasm")
  const text = fs.readFileSync(main, "utf8")
  return [...text.matchAll(/function getHeapMax\(\)\s*\{\s*return (\d+);/g)].map((m) => Number(m[1]))
}

const timeoutS = Number(flag("--timeout-s") ?? 240)

const child = (args: string[]): { line?: string; status: number | null; signal: string | null; stderr: string; wallMs: number } => {
  const t = performance.now()
  const r = spawnSync(process.execPath, [...process.execArgv, SELF, ...args], {
    encoding: "utf8", timeout: timeoutS * 1000, maxBuffer: 64 * 2 ** 20, killSignal: "SIGKILL"
  })
  const line = r.stdout?.split("\n").find((l) => l.startsWith("RESULT "))
  return { line: line?.slice(7), status: r.status, signal: r.signal, stderr: (r.stderr ?? "").trim(), wallMs: performance.now() - t }
}

const runChild = (c: Cand): Result => {
  const params = paramCount(c)
  process.stderr.write(`  running L${c.layers} C${c.width} H${c.heads} B${c.B} (${(params / 1e6).toFixed(1)}M params) ...`)
  const r = child(["--one", JSON.stringify(c)])
  process.stderr.write(` ${(r.wallMs / 1000).toFixed(1)} s\n`)
  if (r.line !== undefined) return JSON.parse(r.line) as Result
  const tail = r.stderr.split("\n").filter((l) => l.trim() !== "").slice(-3).join(" | ")
  const timedOut = r.signal === "SIGKILL" && r.wallMs >= timeoutS * 1000 - 100
  return {
    config: c, params, paramBytes: params * 4, ok: false,
    failure: timedOut ? "timeout" : "crash",
    error: `${timedOut ? `killed after ${timeoutS} s` : `exit ${r.status ?? r.signal}`}: ${tail}`
  }
}

const row = (r: Result): string => {
  const c = r.config
  const cells = [
    `L${c.layers} C${c.width} H${c.heads} T${c.contextLength} B${c.B}`,
    (r.params / 1e6).toFixed(1) + "M",
    gib(r.paramBytes),
    r.ok ? "ok" : `FAIL(${r.failure})`,
    r.stepMs === undefined ? "-" : (r.stepMs / 1000).toFixed(1),
    r.initMs === undefined ? "-" : (r.initMs / 1000).toFixed(1),
    gib(r.maxRssBytes),
    gib(r.heapBytes),
    gib(r.peakLiveBytes),
    r.heapBytes === undefined || !r.ok ? "-" : (r.heapBytes / r.paramBytes).toFixed(2),
    r.loss === undefined ? "-" : r.loss.toFixed(3)
  ]
  return "| " + cells.join(" | ") + " |"
}
const HEADER =
  "| config | params | param GiB | result | step s | init s | maxRSS GiB | heap GiB | peak tensors GiB | heap/param bytes | loss |\n" +
  "|---|---|---|---|---|---|---|---|---|---|---|"

/** Don't start a config whose RSS would pass ~10 GiB: JS params + grads (8 B/param) + a full heap. */
const RSS_LIMIT = 10 * GiB
const predictedRss = (c: Cand): number => 8 * paramCount(c) + 4 * GiB

const main = async (): Promise<void> => {
  console.log("== wasm heap maximum")
  const declared = wasmDeclaredMax()
  for (const [f, n] of Object.entries(declared)) console.log(`  ${f}: memory maximum ${n} bytes (${n === undefined ? "none" : n / 65536 + " pages"})`)
  console.log(`  emscripten glue getHeapMax(): ${glueHeapMax().join(", ")} bytes`)
  const probe = child(["--probe-heap"])
  if (probe.line === undefined) throw new Error(`heap probe failed: ${probe.stderr}`)
  const heap = JSON.parse(probe.line) as { heapMax: number; mallocedBytes: number }
  console.log(`  measured: malloc until it fails grows the heap to ${heap.heapMax} bytes (${gib(heap.heapMax)} GiB); ${heap.mallocedBytes} bytes malloc'ed`)
  console.log(`WASM_HEAP_MAX ${heap.heapMax}`)

  const results: Result[] = []
  const run = (c: Cand): Result => {
    if (predictedRss(c) > RSS_LIMIT) {
      const r: Result = { config: c, params: paramCount(c), paramBytes: 4 * paramCount(c), ok: false, failure: "skipped", error: `predicted RSS ${gib(predictedRss(c))} GiB > 10 GiB` }
      results.push(r)
      return r
    }
    const r = runChild(c)
    results.push(r)
    console.log(row(r))
    return r
  }

  console.log("\n== candidates (one child process each)\n" + HEADER)
  const candidates: Cand[] = [
    cand({ layers: 8, width: 1024, heads: 16 }),
    cand({ layers: 8, width: 1024, heads: 16, B: 2 }),
    cand({ layers: 12, width: 1024, heads: 16 }),
    cand({ layers: 16, width: 1024, heads: 16 }),
    cand({ layers: 24, width: 1024, heads: 16 }),
    cand({ layers: 4, width: 1536, heads: 16 }),
    cand({ layers: 6, width: 1536, heads: 16 }),
    cand({ layers: 8, width: 1536, heads: 16 }),
    cand({ layers: 2, width: 2048, heads: 16 }),
    cand({ layers: 3, width: 2048, heads: 16 }),
    cand({ layers: 4, width: 2048, heads: 16 }),
    cand({ layers: 6, width: 2048, heads: 16 })
  ]
  for (const c of candidates) run(c)

  if (!argv.includes("--no-search")) {
    console.log("\n== binary search on layers at width 1024, heads 16, T 16, B 1\n" + HEADER)
    const at = (layers: number) => results.find((r) => r.config.width === 1024 && r.config.B === 1 && r.config.layers === layers)
    const w1024 = results.filter((r) => r.config.width === 1024 && r.config.B === 1 && r.failure !== "skipped")
    let lo = Math.max(0, ...w1024.filter((r) => r.ok).map((r) => r.config.layers)) // works
    let hi = Math.min(64, ...w1024.filter((r) => !r.ok).map((r) => r.config.layers)) // fails
    while (hi - lo > 1) {
      const mid = Math.floor((lo + hi) / 2)
      const r = at(mid) ?? run(cand({ layers: mid, width: 1024, heads: 16 }))
      if (r.ok) lo = mid
      else if (r.failure === "oom" || r.failure === "crash") hi = mid
      else break
    }
    const good = at(lo)
    const bad = at(hi)
    console.log("")
    if (good) console.log(`LARGEST_WORKING L${lo} C1024: ${good.params} params, ${good.paramBytes} param bytes, step ${((good.stepMs ?? 0) / 1000).toFixed(1)} s, heap ${good.heapBytes} B, peak tensors ${good.peakLiveBytes} B, maxRSS ${gib(good.maxRssBytes)} GiB`)
    if (bad) console.log(`SMALLEST_FAILING L${hi} C1024: ${bad.params} params, ${bad.paramBytes} param bytes: ${bad.failure}: ${bad.error}`)
  }

  console.log("\n== all results\n" + HEADER)
  for (const r of [...results].sort((a, b) => a.params - b.params)) console.log(row(r))
  console.log("\n== failures (exact error text)")
  for (const r of results.filter((r) => !r.ok)) {
    const extra = r.firstFailedBytes === undefined ? "" : ` [first failed malloc ${r.firstFailedBytes} B with ${r.liveAtFirstFail} B live; ${r.failedMallocs} failed]`
    console.log(`  L${r.config.layers} C${r.config.width} B${r.config.B} (${(r.params / 1e6).toFixed(1)}M): ${r.failure}: ${r.error}${extra}`)
    if (r.stack) console.log(`    at ${r.stack.split(" < ").slice(0, 8).join(" < ")}`)
  }
}

const one = flag("--one")
if (one !== undefined) {
  const r = await runOne(cand(JSON.parse(one)))
  console.log("RESULT " + JSON.stringify(r))
  process.exit(0)
} else if (argv.includes("--probe-heap")) {
  console.log("RESULT " + JSON.stringify(await probeHeap()))
  process.exit(0)
} else {
  await main()
}
