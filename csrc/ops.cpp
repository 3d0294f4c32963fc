// Schemas of every fusedattn op; kernels register per device in csrc/cpu and csrc/cuda.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedattn, m) {
  // y = x * sigmoid(e); also returns the per-plane mean and inv = 1/(4(v + e_lambda)), (N, C),
  // fp32 (fp64 for fp64 x), which the backward uses.
  m.def("simam_forward(Tensor x, float e_lambda) -> (Tensor y, Tensor mu, Tensor inv)");
  m.def("simam_backward(Tensor grad, Tensor x, Tensor mu, Tensor inv) -> Tensor");

  // The generic attention passes over full-size tensors (fusedattn/spec/passes.md states the math;
  // csrc/pass_check.h the shapes). SE, ECA, CBAM and HAM are built from them. Small tensors:
  // a, d_mean_c, ... (N, C); s, d_avg, ... (N, G, P) with G = 1 without `group`, 2 with it
  // (group: (N, C) bool, true = group 1; size0/size1 the group sizes, C and 0 without group).
  m.def("pool_pixels(Tensor x, bool with_max) -> (Tensor mean, Tensor max, Tensor argmax)");
  m.def("pool_channels(Tensor x, Tensor a, Tensor? group, int size0, int size1)"
        " -> (Tensor avg, Tensor max, Tensor argmax)");
  m.def("gate(Tensor x, Tensor a, Tensor? s, Tensor? group) -> Tensor");
  m.def("gate_grad_s(Tensor dy, Tensor x, Tensor a, Tensor? group) -> Tensor");
  m.def("grad_a(Tensor x, Tensor dy, Tensor? s, Tensor? group, Tensor? d_avg, Tensor? d_max,"
        " Tensor? argmax, int size0, int size1) -> Tensor");
  m.def("grad_x(Tensor dy, Tensor a, Tensor? s, Tensor? group, Tensor? d_avg, Tensor? d_max,"
        " Tensor? argmax, int size0, int size1, Tensor d_mean_c, Tensor? d_max_c,"
        " Tensor? argmax_c) -> Tensor");

  // Same-padded stride-1 convolution without bias (odd k), and its weight gradient: HAM's
  // spatial conv on CPU (csrc/cpu/conv.cpp); fp32/fp64.
  m.def("same_conv2d(Tensor x, Tensor w) -> Tensor");
  m.def("same_conv2d_weight_grad(Tensor dy, Tensor x, int k) -> Tensor");

  // 2-D relative self-attention of attention-augmented convolution (fusedattn/spec/aaconv.md;
  // fusedattn/ops/aaconv.py states the math and the layouts, csrc/aaconv_check.h the checks):
  // q, k (N, Nh, H W, dkh), v (N, Nh, H W, dvh), any strides; rel_h (2H-1, dkh), rel_w (2W-1,
  // dkh) or both None. out (N, Nh, H W, dvh) with memory ordered (N, Nh, dvh, H W); lse
  // (N, Nh, H W) fp32 (fp64 for fp64); dq, dk, dv memory ordered (N, Nh, d, H W) like out.
  m.def("rel_attention(Tensor q, Tensor k, Tensor v, Tensor? rel_h, Tensor? rel_w, int H, int W,"
        " float scale) -> (Tensor out, Tensor lse)");
  m.def("rel_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rel_h,"
        " Tensor? rel_w, Tensor out, Tensor lse, int H, int W, float scale)"
        " -> (Tensor dq, Tensor dk, Tensor dv, Tensor? drel_h, Tensor? drel_w)");

  // Affine sampling of the spatial transformer (fusedattn/ops/stn.py states the math and the
  // layouts, csrc/stn_check.h the checks): y = grid_sample(x, affine_grid(theta, (N, C, Ho, Wo)))
  // bilinear, zeros padding, without the grid. x (N, C, H, W) contiguous or channels-last; theta
  // (N, 2, 3) contiguous fp32 (fp64 for fp64 x); y in x's memory format; dx gathered (no
  // atomics), dtheta a fixed-order per-sample reduction; each computed only when asked for.
  m.def("affine_sample(Tensor x, Tensor theta, int Ho, int Wo, bool align_corners) -> Tensor");
  m.def("affine_sample_backward(Tensor dy, Tensor x, Tensor theta, bool align_corners,"
        " bool need_dx, bool need_dtheta) -> (Tensor? dx, Tensor? dtheta)");
}

namespace {
bool cuda_compiled() {
#ifdef FUSEDATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedattn C++/CUDA kernels; ops are registered under torch.ops.fusedattn";
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA sources were built into this module");
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
