// Independent C++ oracle of FLASH mixed chunk attention (docs/contract.md sections 2 and 3).
//
// Plain loops in double precision over raw pointers: no ATen math beyond allocating the outputs,
// so this shares no code with the PyTorch or Triton implementations it is used to check.
// The backward is written by hand from the docs/contract.md section 3 formulas, in the same
// chunked form a
// kernel uses (per-chunk S, A, dA, dS tiles; prefix states P_g and reverse suffix sums D_g of the
// linear part), never as a dense T x T matrix, so it checks those exact formulas.
//
// Layout: q_quad, k_quad, q_lin, k_lin: (B, T, S); v, grad_out, out: (B, T, E); rel_bias: (2C - 1).
// All float64, contiguous, CPU. The Python loader (csrc_ref/__init__.py) flattens leading dims.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using OptTensor = std::optional<torch::Tensor>;

// Validates one (B, T, D) float64 contiguous CPU input and returns its last dim D.
int64_t check_btd(const torch::Tensor& x, const char* name, int64_t B, int64_t T) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat64, name, " must be float64");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.dim() == 3, name, " must have shape (B, T, D), got ", x.sizes());
  TORCH_CHECK(x.size(0) == B && x.size(1) == T, name, " has shape ", x.sizes(),
              ", expected leading (", B, ", ", T, ")");
  return x.size(2);
}

// Shared shape validation of forward and backward. Returns {B, T, S, E}.
std::vector<int64_t> check_inputs(const torch::Tensor& q_quad, const torch::Tensor& k_quad,
                                  const OptTensor& q_lin, const OptTensor& k_lin,
                                  const torch::Tensor& v, const OptTensor& rel_bias,
                                  int64_t chunk_size) {
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(v.dim() == 3, "v must have shape (B, T, E), got ", v.sizes());
  const int64_t B = v.size(0), T = v.size(1);
  const int64_t E = check_btd(v, "v", B, T);
  const int64_t S = check_btd(q_quad, "q_quad", B, T);
  TORCH_CHECK(check_btd(k_quad, "k_quad", B, T) == S, "k_quad must have the last dim of q_quad");
  TORCH_CHECK(q_lin.has_value() == k_lin.has_value(),
              "q_lin and k_lin must be both given or both None");
  if (q_lin.has_value()) {
    // The linear roles may in principle have their own width; they only need to agree.
    const int64_t S_lin = check_btd(*q_lin, "q_lin", B, T);
    TORCH_CHECK(check_btd(*k_lin, "k_lin", B, T) == S_lin, "k_lin must have the last dim of q_lin");
  }
  if (rel_bias.has_value()) {
    const auto& rb = *rel_bias;
    TORCH_CHECK(rb.device().is_cpu() && rb.scalar_type() == torch::kFloat64 && rb.is_contiguous(),
                "rel_bias must be a contiguous float64 CPU tensor");
    TORCH_CHECK(rb.dim() == 1 && rb.size(0) == 2 * chunk_size - 1,
                "rel_bias must have shape (2 * chunk_size - 1,) = (", 2 * chunk_size - 1,
                ",), got ", rb.sizes());
  }
  return {B, T, S, E};
}

double dot(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// Score s_ij = quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1] (bias if given).
double score(const double* qq, const double* kq, int64_t i, int64_t j, int64_t S,
             const double* bias, int64_t C, double quad_scale) {
  double s = quad_scale * dot(qq + i * S, kq + j * S, S);
  if (bias != nullptr) s += bias[i - j + C - 1];
  return s;
}

// M_ij: j attends from i only inside one chunk (the caller guarantees that) and, causally, j <= i.
bool allowed(int64_t i, int64_t j, bool causal) { return !causal || j <= i; }

// H_g = sum_{j in chunk g} k_lin_j v_j^T, an S_lin x E matrix (row-major), for each chunk g.
std::vector<double> chunk_states(const double* kl, const double* vv, int64_t T, int64_t C,
                                 int64_t S_lin, int64_t E) {
  const int64_t n_chunks = (T + C - 1) / C;
  std::vector<double> H(n_chunks * S_lin * E, 0.0);
  for (int64_t j = 0; j < T; ++j) {
    double* Hg = H.data() + (j / C) * S_lin * E;
    for (int64_t s = 0; s < S_lin; ++s)
      for (int64_t e = 0; e < E; ++e) Hg[s * E + e] += kl[j * S_lin + s] * vv[j * E + e];
  }
  return H;
}

// Turns per-chunk matrices X_g (n_chunks x N each) into what chunk g sees:
//   causal:     sum_{h < g} X_h  (forward: exclusive prefix, P_g)   when reverse == false
//               sum_{h > g} X_h  (backward: reverse exclusive, D_g) when reverse == true
//   non-causal: sum over all h, for every g.
std::vector<double> combine_chunks(const std::vector<double>& X, int64_t n_chunks, int64_t N,
                                   bool causal, bool reverse) {
  std::vector<double> out(n_chunks * N, 0.0);
  if (!causal) {
    std::vector<double> total(N, 0.0);
    for (int64_t g = 0; g < n_chunks; ++g)
      for (int64_t n = 0; n < N; ++n) total[n] += X[g * N + n];
    for (int64_t g = 0; g < n_chunks; ++g) std::copy(total.begin(), total.end(), out.begin() + g * N);
    return out;
  }
  std::vector<double> running(N, 0.0);
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int64_t g = reverse ? n_chunks - 1 - step : step;
    // Store before adding chunk g's own term: the sum is exclusive.
    std::copy(running.begin(), running.end(), out.begin() + g * N);
    for (int64_t n = 0; n < N; ++n) running[n] += X[g * N + n];
  }
  return out;
}

}  // namespace

// out_i = sum_{j in c(i), M_ij} relu(s_ij)^2 v_j  +  lin_scale * q_lin_i^T P_{c(i)}
// with P_g = sum_{h < g} H_h (causal) or sum_h H_h (non-causal).
torch::Tensor forward(torch::Tensor q_quad, torch::Tensor k_quad, OptTensor q_lin,
                      OptTensor k_lin, torch::Tensor v, OptTensor rel_bias, int64_t chunk_size,
                      bool causal, double quad_scale, double lin_scale) {
  const auto dims = check_inputs(q_quad, k_quad, q_lin, k_lin, v, rel_bias, chunk_size);
  const int64_t B = dims[0], T = dims[1], S = dims[2], E = dims[3], C = chunk_size;
  const int64_t S_lin = q_lin.has_value() ? q_lin->size(2) : 0;
  const int64_t n_chunks = (T + C - 1) / C;
  auto out = torch::zeros({B, T, E}, v.options());
  const double* bias = rel_bias.has_value() ? rel_bias->data_ptr<double>() : nullptr;

  for (int64_t b = 0; b < B; ++b) {
    const double* qq = q_quad.data_ptr<double>() + b * T * S;
    const double* kq = k_quad.data_ptr<double>() + b * T * S;
    const double* vv = v.data_ptr<double>() + b * T * E;
    double* o = out.data_ptr<double>() + b * T * E;

    // Quadratic part: exact relu^2 attention inside each (possibly partial) chunk.
    for (int64_t g = 0; g < n_chunks; ++g) {
      const int64_t start = g * C, stop = std::min(T, start + C);
      for (int64_t i = start; i < stop; ++i)
        for (int64_t j = start; j < stop; ++j) {
          if (!allowed(i, j, causal)) continue;
          const double r = std::max(score(qq, kq, i, j, S, bias, C, quad_scale), 0.0);
          const double a = r * r;
          for (int64_t e = 0; e < E; ++e) o[i * E + e] += a * vv[j * E + e];
        }
    }

    // Linear part through the per-chunk states, as a kernel computes it.
    if (q_lin.has_value()) {
      const double* ql = q_lin->data_ptr<double>() + b * T * S_lin;
      const double* kl = k_lin->data_ptr<double>() + b * T * S_lin;
      const auto H = chunk_states(kl, vv, T, C, S_lin, E);
      const auto P = combine_chunks(H, n_chunks, S_lin * E, causal, /*reverse=*/false);
      for (int64_t i = 0; i < T; ++i) {
        const double* Pg = P.data() + (i / C) * S_lin * E;
        for (int64_t e = 0; e < E; ++e) {
          double acc = 0.0;
          for (int64_t s = 0; s < S_lin; ++s) acc += ql[i * S_lin + s] * Pg[s * E + e];
          o[i * E + e] += lin_scale * acc;
        }
      }
    }
  }
  return out;
}

// Hand-written backward, docs/contract.md section 3, per chunk g (rows i, columns j of the
// chunk's tile):
//   quadratic:  dA = dO V^T, dS = dA * 2 relu(S) * M, dV_quad = A^T dO,
//               dq_quad = quad_scale dS k_quad, dk_quad = quad_scale dS^T q_quad,
//               drel_bias[o + C - 1] = sum_{i - j = o} dS_ij (all chunks, all batch entries)
//   linear:     dq_lin_g = lin_scale dO_g P_g^T, dP_g = lin_scale q_lin_g^T dO_g,
//               D_g = sum_{h > g} dP_h (causal) or sum_h dP_h (non-causal),
//               dk_lin_g = V_g D_g^T, dV_lin_g = k_lin_g D_g;   dV = dV_quad + dV_lin.
// Returns [dq_quad, dk_quad, dq_lin, dk_lin, dv, drel_bias]; absent inputs get undefined (None).
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor q_quad,
                                    torch::Tensor k_quad, OptTensor q_lin, OptTensor k_lin,
                                    torch::Tensor v, OptTensor rel_bias, int64_t chunk_size,
                                    bool causal, double quad_scale, double lin_scale) {
  const auto dims = check_inputs(q_quad, k_quad, q_lin, k_lin, v, rel_bias, chunk_size);
  const int64_t B = dims[0], T = dims[1], S = dims[2], E = dims[3], C = chunk_size;
  TORCH_CHECK(check_btd(grad_out, "grad_out", B, T) == E, "grad_out must have the shape of v");
  const bool has_lin = q_lin.has_value();
  const int64_t S_lin = has_lin ? q_lin->size(2) : 0;
  const int64_t n_chunks = (T + C - 1) / C;
  const double* bias = rel_bias.has_value() ? rel_bias->data_ptr<double>() : nullptr;

  auto dq_quad = torch::zeros_like(q_quad);
  auto dk_quad = torch::zeros_like(k_quad);
  auto dv = torch::zeros_like(v);
  torch::Tensor dq_lin, dk_lin, drel_bias;  // undefined -> None in Python when absent
  if (has_lin) {
    dq_lin = torch::zeros_like(*q_lin);
    dk_lin = torch::zeros_like(*k_lin);
  }
  if (bias != nullptr) drel_bias = torch::zeros_like(*rel_bias);
  double* drb = bias != nullptr ? drel_bias.data_ptr<double>() : nullptr;

  // Per-chunk C x C tiles, reused across chunks (row-major, rows = queries i, cols = keys j).
  std::vector<double> A(C * C), dS(C * C);

  for (int64_t b = 0; b < B; ++b) {
    const double* qq = q_quad.data_ptr<double>() + b * T * S;
    const double* kq = k_quad.data_ptr<double>() + b * T * S;
    const double* vv = v.data_ptr<double>() + b * T * E;
    const double* dO = grad_out.data_ptr<double>() + b * T * E;
    double* dqq = dq_quad.data_ptr<double>() + b * T * S;
    double* dkq = dk_quad.data_ptr<double>() + b * T * S;
    double* dvv = dv.data_ptr<double>() + b * T * E;

    // ---- Quadratic part, one chunk tile at a time. ----
    for (int64_t g = 0; g < n_chunks; ++g) {
      const int64_t start = g * C, L = std::min(T, start + C) - start;  // L < C: partial chunk

      // Recompute S and A; form dA = dO V^T and dS = dA * 2 relu(S) * M (zero where masked).
      for (int64_t r = 0; r < L; ++r)
        for (int64_t c = 0; c < L; ++c) {
          const int64_t i = start + r, j = start + c;
          if (!allowed(i, j, causal)) {
            A[r * C + c] = 0.0;
            dS[r * C + c] = 0.0;
            continue;
          }
          const double relu_s = std::max(score(qq, kq, i, j, S, bias, C, quad_scale), 0.0);
          A[r * C + c] = relu_s * relu_s;
          const double dA = dot(dO + i * E, vv + j * E, E);
          dS[r * C + c] = dA * 2.0 * relu_s;
        }

      // dV_quad = A^T dO.
      for (int64_t c = 0; c < L; ++c)
        for (int64_t r = 0; r < L; ++r) {
          const double a = A[r * C + c];
          for (int64_t e = 0; e < E; ++e) dvv[(start + c) * E + e] += a * dO[(start + r) * E + e];
        }
      // dq_quad = quad_scale * dS k_quad.
      for (int64_t r = 0; r < L; ++r)
        for (int64_t c = 0; c < L; ++c) {
          const double d = quad_scale * dS[r * C + c];
          for (int64_t s = 0; s < S; ++s) dqq[(start + r) * S + s] += d * kq[(start + c) * S + s];
        }
      // dk_quad = quad_scale * dS^T q_quad.
      for (int64_t c = 0; c < L; ++c)
        for (int64_t r = 0; r < L; ++r) {
          const double d = quad_scale * dS[r * C + c];
          for (int64_t s = 0; s < S; ++s) dkq[(start + c) * S + s] += d * qq[(start + r) * S + s];
        }
      // drel_bias[o + C - 1] += dS_ij for i - j = o (the bias is shared by every chunk).
      if (drb != nullptr)
        for (int64_t r = 0; r < L; ++r)
          for (int64_t c = 0; c < L; ++c) drb[r - c + C - 1] += dS[r * C + c];
    }

    // ---- Linear part through prefix states P_g and reverse suffix sums D_g. ----
    if (has_lin) {
      const double* ql = q_lin->data_ptr<double>() + b * T * S_lin;
      const double* kl = k_lin->data_ptr<double>() + b * T * S_lin;
      double* dql = dq_lin.data_ptr<double>() + b * T * S_lin;
      double* dkl = dk_lin.data_ptr<double>() + b * T * S_lin;
      const int64_t N = S_lin * E;

      const auto H = chunk_states(kl, vv, T, C, S_lin, E);
      const auto P = combine_chunks(H, n_chunks, N, causal, /*reverse=*/false);

      // dP_g = lin_scale * q_lin_g^T dO_g (S_lin x E) for every chunk.
      std::vector<double> dP(n_chunks * N, 0.0);
      for (int64_t i = 0; i < T; ++i) {
        double* dPg = dP.data() + (i / C) * N;
        for (int64_t s = 0; s < S_lin; ++s)
          for (int64_t e = 0; e < E; ++e) dPg[s * E + e] += lin_scale * ql[i * S_lin + s] * dO[i * E + e];
      }
      // Chunk g's state feeds queries of chunks h > g (causal) or of every chunk (non-causal).
      const auto D = combine_chunks(dP, n_chunks, N, causal, /*reverse=*/true);

      for (int64_t i = 0; i < T; ++i) {
        const double* Pg = P.data() + (i / C) * N;
        const double* Dg = D.data() + (i / C) * N;
        for (int64_t s = 0; s < S_lin; ++s) {
          // dq_lin_i = lin_scale * P_g dO_i (row i of dO_g P_g^T); dk_lin_i = D_g v_i (row of V_g D_g^T).
          double acc_q = 0.0, acc_k = 0.0;
          for (int64_t e = 0; e < E; ++e) {
            acc_q += dO[i * E + e] * Pg[s * E + e];
            acc_k += vv[i * E + e] * Dg[s * E + e];
          }
          dql[i * S_lin + s] = lin_scale * acc_q;
          dkl[i * S_lin + s] = acc_k;
        }
        // dV_lin_i = D_g^T k_lin_i (row i of k_lin_g D_g), added to dV_quad.
        for (int64_t e = 0; e < E; ++e) {
          double acc = 0.0;
          for (int64_t s = 0; s < S_lin; ++s) acc += kl[i * S_lin + s] * Dg[s * E + e];
          dvv[i * E + e] += acc;
        }
      }
    }
  }
  return {dq_quad, dk_quad, dq_lin, dk_lin, dv, drel_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Independent float64 loop oracle of FLASH mixed chunk attention (forward + backward)";
  m.def("forward", &forward, "mixed chunk attention forward (float64 loops)", py::arg("q_quad"),
        py::arg("k_quad"), py::arg("q_lin"), py::arg("k_lin"), py::arg("v"), py::arg("rel_bias"),
        py::arg("chunk_size"), py::arg("causal"), py::arg("quad_scale"), py::arg("lin_scale"));
  m.def("backward", &backward, "mixed chunk attention hand-written backward (float64 loops)",
        py::arg("grad_out"), py::arg("q_quad"), py::arg("k_quad"), py::arg("q_lin"),
        py::arg("k_lin"), py::arg("v"), py::arg("rel_bias"), py::arg("chunk_size"),
        py::arg("causal"), py::arg("quad_scale"), py::arg("lin_scale"));
}
