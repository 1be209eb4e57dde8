// Python binding of defmamba_scan_cuda.
#include <torch/extension.h>

#include "scan_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DefMamba selective scan (S6) forward and backward CUDA kernels";
  m.def("fwd", &dmscan::scan_fwd, "selective scan forward -> [out, states]", py::arg("u"), py::arg("delta"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("delta_softplus"),
        py::arg("out_float"));
  m.def("bwd", &dmscan::scan_bwd, "selective scan backward -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("delta_bias"), py::arg("dout"), py::arg("states"), py::arg("delta_softplus"));
}
