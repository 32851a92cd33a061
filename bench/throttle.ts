// Implements: a slow link on loopback for the benches — a TCP proxy with a token-bucket
// bandwidth limit (default 100 Mbit/s) and an optional one-way latency, that counts the
// bytes it carries each way. bench/compression.ts puts it between the workers and
// nats-server, so what crosses the "WAN" is exactly what a worker sends and receives.
// Run alone: node bench/throttle.ts --target nats://127.0.0.1:4222 [--port 4223]
//            [--mbit 100] [--latency-ms 0]   (prints the counts every 5 s and on Ctrl-C)
// Does not own: NATS (it forwards bytes and knows nothing of the protocol), the benches.
//
// The link is full duplex: one bucket per direction ("up" = client → target, "down" =
// target → client), each shared by every connection through the proxy, as one access
// link is shared by the processes of one host. Chunks leave a direction's FIFO in arrival
// order while the bucket holds tokens; a chunk may take the bucket below zero (a deficit,
// paid back before the next chunk leaves), so the long-run rate is exact and a burst is at
// most one chunk (≤ 16 KiB, ~1.3 ms at 100 Mbit/s). With latency, each chunk is written
// `latencyMs` after it left the bucket (bandwidth-delay: a window of bytes in flight).
// Backpressure: a connection with more than `highWaterBytes` queued in a direction stops
// reading its source until the queue is half that, so a sender sees a slow link the way
// TCP would show it (its writes back up) instead of an infinite buffer.
import net from "node:net"

export interface ThrottleOptions {
  /** where to forward, e.g. nats://127.0.0.1:4222 or { host, port }. */
  readonly target: string | { readonly host: string; readonly port: number }
  /** megabits per second, each direction (10^6 bit/s); default 100. Infinity = no limit. */
  readonly mbit?: number
  /** added one-way delay per chunk, ms; default 0. */
  readonly latencyMs?: number
  /** listen port; default 0 (a free one). */
  readonly port?: number
  readonly host?: string
  /** per connection and direction; default 256 KiB. */
  readonly highWaterBytes?: number
}

export interface LinkCounts {
  /** bytes client → target. */
  readonly up: number
  /** bytes target → client. */
  readonly down: number
  readonly connections: number
}

export interface Throttle {
  /** nats://host:port of the proxy (give it to the clients instead of the server's). */
  readonly url: string
  readonly port: number
  /** bytes carried so far (delivered, not queued). */
  counts(): LinkCounts
  close(): Promise<void>
}

const CHUNK = 16 * 1024

const parseTarget = (t: ThrottleOptions["target"]): { host: string; port: number } => {
  if (typeof t !== "string") return t
  const u = new URL(t.includes("://") ? t : `nats://${t}`)
  return { host: u.hostname, port: Number(u.port || 4222) }
}

interface Piece {
  readonly data: Buffer | null // null: end of stream (after the bytes before it)
  readonly to: net.Socket
  readonly queue: { bytes: number; resume: () => void }
}

/** One direction of the link: a FIFO drained through a token bucket. */
const makeDirection = (bytesPerMs: number, latencyMs: number, onSent: (n: number) => void) => {
  const fifo: Piece[] = []
  let head = 0
  let tokens = 0
  let last = performance.now()
  let timer: NodeJS.Timeout | undefined
  const deliver = (p: Piece) => {
    if (p.data === null) p.to.end()
    else if (!p.to.destroyed) {
      p.to.write(p.data)
      onSent(p.data.length)
    }
  }
  const pump = () => {
    timer = undefined
    const now = performance.now()
    // a full bucket holds one chunk: idle time does not buy a long burst
    tokens = Math.min(CHUNK, tokens + (now - last) * bytesPerMs)
    last = now
    while (head < fifo.length && tokens > 0) {
      const p = fifo[head++]
      const n = p.data?.length ?? 0
      tokens -= n
      p.queue.bytes -= n
      p.queue.resume()
      if (latencyMs > 0) setTimeout(deliver, latencyMs, p)
      else deliver(p)
    }
    if (head > 1024 && head * 2 > fifo.length) {
      fifo.splice(0, head)
      head = 0
    }
    if (head < fifo.length) timer = setTimeout(pump, Math.max(1, -tokens / bytesPerMs))
  }
  return {
    push: (p: Piece) => {
      if (p.data !== null && p.data.length > CHUNK) {
        for (let o = 0; o < p.data.length; o += CHUNK) fifo.push({ ...p, data: p.data.subarray(o, Math.min(o + CHUNK, p.data.length)) })
      } else fifo.push(p)
      p.queue.bytes += p.data?.length ?? 0
      if (timer === undefined) {
        if (Number.isFinite(bytesPerMs)) pump()
        else {
          // unlimited: straight through
          while (head < fifo.length) {
            const q = fifo[head++]
            q.queue.bytes -= q.data?.length ?? 0
            if (latencyMs > 0) setTimeout(deliver, latencyMs, q)
            else deliver(q)
          }
          fifo.length = 0
          head = 0
        }
      }
    },
    stop: () => timer !== undefined && clearTimeout(timer)
  }
}

export const startThrottle = (o: ThrottleOptions): Promise<Throttle> => {
  const target = parseTarget(o.target)
  const mbit = o.mbit ?? 100
  const bytesPerMs = (mbit * 1e6) / 8 / 1000
  const latencyMs = o.latencyMs ?? 0
  const high = o.highWaterBytes ?? 256 * 1024
  let up = 0
  let down = 0
  let connections = 0
  const upLink = makeDirection(bytesPerMs, latencyMs, (n) => (up += n))
  const downLink = makeDirection(bytesPerMs, latencyMs, (n) => (down += n))
  const sockets = new Set<net.Socket>()

  const server = net.createServer((client) => {
    connections++
    client.setNoDelay(true)
    const upstream = net.connect(target)
    upstream.setNoDelay(true)
    sockets.add(client)
    sockets.add(upstream)
    const wire = (from: net.Socket, to: net.Socket, link: ReturnType<typeof makeDirection>) => {
      const queue = {
        bytes: 0,
        resume: () => {
          if (from.isPaused() && queue.bytes < high / 2) from.resume()
        }
      }
      from.on("data", (data: Buffer) => {
        link.push({ data, to, queue })
        if (queue.bytes > high) from.pause()
      })
      from.on("end", () => link.push({ data: null, to, queue }))
    }
    wire(client, upstream, upLink)
    wire(upstream, client, downLink)
    const kill = () => {
      client.destroy()
      upstream.destroy()
      sockets.delete(client)
      sockets.delete(upstream)
    }
    client.on("error", kill)
    upstream.on("error", kill)
    client.on("close", kill)
    upstream.on("close", kill)
  })

  return new Promise((resolve, reject) => {
    server.once("error", reject)
    server.listen(o.port ?? 0, o.host ?? "127.0.0.1", () => {
      const addr = server.address() as net.AddressInfo
      resolve({
        url: `nats://${addr.address}:${addr.port}`,
        port: addr.port,
        counts: () => ({ up, down, connections }),
        close: () =>
          new Promise<void>((done) => {
            upLink.stop()
            downLink.stop()
            for (const s of sockets) s.destroy()
            server.close(() => done())
          })
      })
    })
  })
}

// ---------------------------------------------------------------- run alone

if (import.meta.main) {
  const { parseArgs } = await import("node:util")
  const { values: v } = parseArgs({ options: { target: { type: "string" }, port: { type: "string" }, mbit: { type: "string" }, "latency-ms": { type: "string" } } })
  if (!v.target) {
    process.stderr.write("usage: node bench/throttle.ts --target nats://127.0.0.1:4222 [--port 4223] [--mbit 100] [--latency-ms 0]\n")
    process.exit(2)
  }
  const t = await startThrottle({ target: v.target, port: Number(v.port ?? 0), mbit: Number(v.mbit ?? 100), latencyMs: Number(v["latency-ms"] ?? 0) })
  const show = () => {
    const c = t.counts()
    process.stdout.write(`throttle ${t.url} → ${v.target}: up ${(c.up / 1e6).toFixed(2)} MB, down ${(c.down / 1e6).toFixed(2)} MB, ${c.connections} connections\n`)
  }
  process.stdout.write(`throttle listening on ${t.url}, ${v.mbit ?? 100} Mbit/s each way, latency ${v["latency-ms"] ?? 0} ms\n`)
  const every = setInterval(show, 5000)
  process.once("SIGINT", async () => {
    clearInterval(every)
    show()
    await t.close()
    process.exit(0)
  })
}
