// Stubs of libc10_cuda for a load-time schema check on a CPU-only torch (never called).
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cstdlib>
namespace c10 { namespace cuda {
DeviceIndex device_count() noexcept { return 0; }
DeviceIndex ExchangeDevice(DeviceIndex) { std::abort(); }
cudaError_t MaybeSetDevice(DeviceIndex) { std::abort(); }
cudaError_t GetDevice(DeviceIndex*) { std::abort(); }
cudaError_t SetDevice(DeviceIndex, bool) { std::abort(); }
CUDAStream getStreamFromPool(const bool, DeviceIndex) { std::abort(); }
CUDAStream getStreamFromPool(const int, DeviceIndex) { std::abort(); }
CUDAStream getDefaultCUDAStream(DeviceIndex) { std::abort(); }
CUDAStream getCurrentCUDAStream(DeviceIndex) { std::abort(); }
void setCurrentCUDAStream(CUDAStream) { std::abort(); }
void c10_cuda_check_implementation(const int32_t, const char*, const char*, uint32_t, const bool) { std::abort(); }
void CUDAStream::synchronize() const { std::abort(); }
bool CUDAStream::query() const { std::abort(); }
cudaStream_t CUDAStream::stream() const { std::abort(); }
namespace CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }
}}
