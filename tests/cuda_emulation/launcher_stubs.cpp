// Launcher stubs for check_bindings.py: the binding links and loads against a CPU torch (never called).
#include "kernels.cuh"
namespace ppt_fast { namespace cuda {
cudaError_t sensitivity_accumulate_launch(const SensTensor*, int, int64_t, int, cudaStream_t) { return cudaSuccess; }
size_t select_pivots_workspace_bytes(int, int64_t) { return 0; }
cudaError_t select_pivots_launch(const ScoreTensor*, int, int64_t, int64_t, void*, size_t, int64_t*, int32_t*, int32_t*, cudaStream_t) { return cudaSuccess; }
cudaError_t sparse_adamw_step_launch(const AdamTensor*, const int64_t*, int, const int32_t*, int64_t, float*, float*, float*, const void*, int32_t, const float*, const float*, const float*, float*, float*, AdamHyper, cudaStream_t) { return cudaSuccess; }
}}
