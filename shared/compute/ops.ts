// Implements: the differentiable building blocks Flotilla's models share: a 2-D matMul
// whose gradient stays on the backend's fast path, linear layers over it, LayerNorm,
// tanh-GELU, and numerically stable losses from logits.
// Owns: op definitions and their custom gradients. Does not own: model structure
// (shared/models/*) or kernel registration (kernels.ts).
//
// Shapes: N rows (N = B*T for sequence models), Cin/Cout feature widths, V classes,
// S independent matrices in a batched product.

import * as tf from "@tensorflow/tfjs"

// ---------------------------------------------------------------------------------
// matMul2d / batchMatMul: plain products whose gradients are plain, non-transposed matMuls.
// tfjs' autodiff of matMul uses transposed-operand matMuls, which the wasm backend runs
// off XNNPACK (~1-2 GFLOP/s against ~25): transposing explicitly first and then calling
// a plain matMul took a gpt-mini step from 14.1 s to 3.7 s (PERF-NOTES.md). The same
// holds, less dramatically, for batched matMul (measured: attention's [128,128,32] @
// [128,32,128] ~2x faster with K transposed explicitly than with transposeB).

/** Plain matMul of a and b whose gradient transposes explicitly, then multiplies plainly.
 *  Works for 2-D ([N,K] @ [K,M]) and 3-D batched ([S,N,K] @ [S,K,M]) operands. */
const plainGradMatMul = tf.customGrad((a, b, save) => {
  const A = a as tf.Tensor
  const B = b as tf.Tensor
  ;(save as tf.GradSaveFunc)([A, B])
  return {
    value: tf.matMul(A, B),
    gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
      const [sa, sb] = saved
      const perm = sa.rank === 2 ? [1, 0] : [0, 2, 1] // swap the last two axes
      return [
        tf.matMul(dy, tf.transpose(sb, perm)), // dA = dY @ B^T : [.., N,M] @ [.., M,K]
        tf.matMul(tf.transpose(sa, perm), dy) //  dB = A^T @ dY : [.., K,N] @ [.., N,M]
      ]
    }
  }
})

/** Process-wide switch, for bench/model.ts only: false falls back to tfjs' stock matMul
 *  autodiff (transposed-operand gradients) so the two can be timed on one model. */
let plainGrads = true
export const setPlainMatMulGradients = (on: boolean): void => {
  plainGrads = on
}

/** a: [N,K] @ b: [K,M] -> [N,M], with fast-path (plain 2-D) gradients. */
export const matMul2d = (a: tf.Tensor2D, b: tf.Tensor2D): tf.Tensor2D => {
  if (a.rank !== 2 || b.rank !== 2 || a.shape[1] !== b.shape[0]) {
    throw new Error(`matMul2d: expected [N,K] @ [K,M], got [${a.shape}] @ [${b.shape}]`)
  }
  return (plainGrads ? plainGradMatMul(a, b) : tf.matMul(a, b)) as tf.Tensor2D
}

/** Batched a: [S,N,K] @ b: [S,K,M] -> [S,N,M], gradients without transposed operands. */
export const batchMatMul = (a: tf.Tensor3D, b: tf.Tensor3D): tf.Tensor3D => {
  if (a.rank !== 3 || b.rank !== 3 || a.shape[0] !== b.shape[0] || a.shape[2] !== b.shape[1]) {
    throw new Error(`batchMatMul: expected [S,N,K] @ [S,K,M], got [${a.shape}] @ [${b.shape}]`)
  }
  return (plainGrads ? plainGradMatMul(a, b) : tf.matMul(a, b)) as tf.Tensor3D
}

/** Linear layer. x: [..., Cin], w: [Cin, Cout], b: [Cout] -> [..., Cout].
 *  Leading dims are flattened so the product is one plain 2-D matMul. */
export const linear = <R extends tf.Rank>(x: tf.Tensor<R>, w: tf.Tensor, b?: tf.Tensor): tf.Tensor<R> => {
  const shape = x.shape as number[]
  const cin = shape[shape.length - 1]
  const cout = w.shape[1] as number
  const lead = shape.slice(0, -1)
  const x2 = x.rank === 2 ? (x as unknown as tf.Tensor2D) : tf.reshape(x, [-1, cin]) as tf.Tensor2D
  let y: tf.Tensor = matMul2d(x2, w as tf.Tensor2D)
  if (b !== undefined) y = tf.add(y, b)
  return (x.rank === 2 ? y : tf.reshape<tf.Rank>(y, [...lead, cout])) as tf.Tensor<R>
}

/** LayerNorm over the last axis. x: [..., C], gamma/beta: [C]. */
export const layerNorm = <R extends tf.Rank>(
  x: tf.Tensor<R>,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  eps = 1e-5
): tf.Tensor<R> => {
  const axis = x.rank - 1
  const mean = tf.mean(x, axis, true)
  const xc = tf.sub(x, mean)
  const variance = tf.mean(tf.square(xc), axis, true)
  const xhat = tf.mul(xc, tf.rsqrt(tf.add(variance, eps)))
  return tf.add(tf.mul(xhat, gamma), beta) as tf.Tensor<R>
}

const GELU_2C = 2 * Math.sqrt(2 / Math.PI)

/** GELU, tanh approximation (GPT-2's): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
 *  Computed as x·σ(2·√(2/π)·(x + 0.044715·x³)), the same function (½(1 + tanh z) = σ(2z)),
 *  because the wasm backend's Tanh is scalar code (39 ms for [4096, 512]) while its
 *  Sigmoid is vectorised (2 ms). */
export const gelu = <T extends tf.Tensor>(x: T): T => {
  const x3 = tf.mul(tf.mul(x, x), x)
  const z = tf.mul(tf.add(x, tf.mul(x3, 0.044715)), GELU_2C)
  return tf.mul(x, tf.sigmoid(z)) as T
}

/**
 * Mean softmax cross-entropy. logits: [N,V] float32, targets: [N] int32 in [0,V).
 * Stable (log-sum-exp after subtracting the row max); gradient written out as
 * (softmax - onehot) / N so backward is two element-wise ops.
 */
export const softmaxCrossEntropy = (logits: tf.Tensor2D, targets: tf.Tensor1D): tf.Scalar => {
  const [n, v] = logits.shape
  if (targets.shape[0] !== n) throw new Error(`softmaxCrossEntropy: ${n} rows but ${targets.shape[0]} targets`)
  const f = tf.customGrad((z, save) => {
    const zc = tf.sub(z as tf.Tensor2D, tf.max(z as tf.Tensor2D, 1, true)) // [N,V], row max 0
    const lse = tf.log(tf.sum(tf.exp(zc), 1, true)) // [N,1]
    const logp = tf.sub(zc, lse) // [N,V]
    const onehot = tf.oneHot(tf.cast(targets, "int32"), v) // [N,V]
    ;(save as tf.GradSaveFunc)([logp, onehot])
    return {
      value: tf.div(tf.neg(tf.sum(tf.mul(logp, onehot))), n) as tf.Scalar,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [lp, oh] = saved
        return tf.mul(tf.sub(tf.exp(lp), oh), tf.div(dy, n)) // [N,V]
      }
    }
  })
  return f(logits) as tf.Scalar
}

/**
 * Mean binary cross-entropy from logits. logits: [N], labels: [N] in {0,1} (or [0,1]).
 * Stable form max(z,0) - z·y + log(1 + e^-|z|); gradient (sigmoid(z) - y) / N.
 */
export const sigmoidCrossEntropy = (logits: tf.Tensor1D, labels: tf.Tensor1D): tf.Scalar => {
  const n = logits.shape[0]
  if (labels.shape[0] !== n) throw new Error(`sigmoidCrossEntropy: ${n} logits but ${labels.shape[0]} labels`)
  const f = tf.customGrad((z, save) => {
    const zt = z as tf.Tensor1D
    const y = tf.cast(labels, "float32")
    ;(save as tf.GradSaveFunc)([zt, y])
    const perRow = tf.add(tf.sub(tf.relu(zt), tf.mul(zt, y)), tf.log1p(tf.exp(tf.neg(tf.abs(zt)))))
    return {
      value: tf.mean(perRow) as tf.Scalar,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [sz, sy] = saved
        return tf.mul(tf.sub(tf.sigmoid(sz), sy), tf.div(dy, n)) // [N]
      }
    }
  })
  return f(logits) as tf.Scalar
}
