// edgekit-runner: run an edgekit bundle's model with TVM's C++ runtime, no Python involved.
//
//   ./edgekit-runner [--repeat N] [--warmup N] [--out DIR] INPUT...
//
// Loads model.so next to this binary, starts the Relax VM on the CPU, feeds it one .npy (or raw)
// file per input, writes output0.npy, output1.npy, ... to --out and, with --repeat, prints latency
// percentiles. inputs.txt (beside the binary) lists what main takes, a "name dtype d0,d1,..."
// line per input, so a wrong file is refused before the VM sees it.
// Exit code: 0 ok, 1 error (one line on stderr), 2 usage.
//
// Copy what you need: loading (LoadFromFile, vm_load_executable, vm_initialization) and calling
// (main) are the only TVM calls; the rest is reading and writing arrays.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

namespace ffi = tvm::ffi;
using Clock = std::chrono::steady_clock;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Spec {  // one input of main, as inputs.txt declares it
  std::string name, dtype;
  std::vector<int64_t> shape;
};

// numpy's dtype codes for the types edgekit's models use.
static const struct { const char *npy, *name; DLDataType dl; } kTypes[] = {
    {"<f4", "float32", {kDLFloat, 32, 1}}, {"<f2", "float16", {kDLFloat, 16, 1}},
    {"<f8", "float64", {kDLFloat, 64, 1}}, {"<i8", "int64", {kDLInt, 64, 1}},
    {"<i4", "int32", {kDLInt, 32, 1}},     {"|i1", "int8", {kDLInt, 8, 1}},
    {"|u1", "uint8", {kDLUInt, 8, 1}},     {"|b1", "bool", {kDLBool, 8, 1}},
};

static DLDataType DType(const std::string& name) {
  for (const auto& t : kTypes) if (name == t.name) return t.dl;
  throw Failure("unsupported dtype " + name);
}

static const char* NpyCode(DLDataType dl) {
  for (const auto& t : kTypes)
    if (t.dl.code == dl.code && t.dl.bits == dl.bits) return t.npy;
  throw Failure("the model returned a dtype this runner cannot write as .npy");
}

static std::string Dims(const std::vector<int64_t>& shape) {
  std::string out;
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "x" : "") + std::to_string(shape[i]);
  return shape.empty() ? "scalar" : out;
}

static std::string Dir(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

static std::string SelfDir() {  // the bundle: the folder holding this binary
  std::vector<char> buf(4096);
  ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? Dir(std::string(buf.data(), n)) : ".";
}

static std::vector<Spec> ReadSpecs(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Failure("cannot read " + path + " (is the bundle complete?)");
  std::vector<Spec> specs;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream words(line);
    Spec spec;
    std::string dims;
    words >> spec.name >> spec.dtype >> dims;
    std::replace(dims.begin(), dims.end(), ',', ' ');
    std::istringstream ds(dims);
    for (int64_t d; ds >> d;) spec.shape.push_back(d);
    specs.push_back(spec);
  }
  return specs;
}

// A .npy file's array (version 1-3, little endian, C order), or a raw file of exactly the bytes
// the input needs.
static ffi::Tensor ReadInput(const std::string& path, const Spec& want, size_t index) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure("cannot read input file " + path);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string dtype = want.dtype;
  std::vector<int64_t> shape = want.shape;
  size_t offset = 0;
  if (bytes.compare(0, 6, "\x93NUMPY") == 0 && bytes.size() >= 10) {
    size_t len = bytes[6] == 1 ? (uint8_t)bytes[8] | (uint8_t)bytes[9] << 8
                               : (uint8_t)bytes[8] | (uint8_t)bytes[9] << 8 |
                                     (uint8_t)bytes[10] << 16 | (size_t)(uint8_t)bytes[11] << 24;
    offset = (bytes[6] == 1 ? 10 : 12) + len;
    std::string header = bytes.substr(0, std::min(offset, bytes.size()));
    if (header.find("'fortran_order': True") != std::string::npos)
      throw Failure(path + " is in Fortran order; save it with np.ascontiguousarray");
    size_t d = header.find("'descr': '");
    std::string code = d == std::string::npos ? "" : header.substr(d + 10, 3);
    dtype = "";
    for (const auto& t : kTypes) if (code == t.npy) dtype = t.name;
    if (dtype.empty()) throw Failure(path + " has numpy dtype '" + code + "', unsupported");
    shape.clear();
    size_t s = header.find("'shape': (");
    if (s == std::string::npos) throw Failure(path + " has no shape in its .npy header");
    std::istringstream dims(header.substr(s + 10, header.find(')', s) - s - 10));
    for (std::string dim; std::getline(dims, dim, ',');)
      if (dim.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(dim));
  }
  std::string what = "input " + std::to_string(index) + " (" + want.name + ", " + path + ")";
  if (dtype != want.dtype || shape != want.shape)
    throw Failure(what + " is " + Dims(shape) + " " + dtype + ", but the model takes " +
                  Dims(want.shape) + " " + want.dtype);
  struct Alloc {
    void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
    void FreeData(DLTensor* t) { std::free(t->data); }
  };
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(Alloc(), ffi::Shape(shape), DType(dtype),
                                                DLDevice{kDLCPU, 0});
  size_t size = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  if (bytes.size() - std::min(offset, bytes.size()) != size)
    throw Failure(what + " holds " + std::to_string(bytes.size() - offset) + " bytes of data, " +
                  "but " + Dims(want.shape) + " " + want.dtype + " needs " + std::to_string(size));
  std::memcpy(tensor.data_ptr(), bytes.data() + offset, size);
  return tensor;
}

static void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  std::string dims;
  for (int64_t d : t.shape()) dims += std::to_string(d) + ", ";
  if (t.ndim() == 1) dims.pop_back();  // (10,) stays a tuple; (1, 10) loses its last ", "
  else if (t.ndim() > 1) dims.resize(dims.size() - 2);
  std::string header = "{'descr': '" + std::string(NpyCode(t.dtype())) +
                       "', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');  // 64-byte aligned data
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(header.size() & 0xff)).put(static_cast<char>(header.size() >> 8));
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()), ffi::GetDataSize(*t.GetDLTensorPtr()));
  if (!out) throw Failure("cannot write " + path);
}

static void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto items = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) Flatten(item, out);
  } else {
    throw Failure("main returned something other than tensors: " + value.GetTypeKey());
  }
}

static double Ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

static int Run(int argc, char** argv) {
  int repeat = 0, warmup = 1;
  std::string out_dir = ".";
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    bool has_value = i + 1 < argc;
    if (arg == "--repeat" && has_value) repeat = std::atoi(argv[++i]);
    else if (arg == "--warmup" && has_value) warmup = std::atoi(argv[++i]);
    else if (arg == "--out" && has_value) out_dir = argv[++i];
    else if (arg.rfind("-", 0) == 0) {
      std::cerr << "usage: edgekit-runner [--repeat N] [--warmup N] [--out DIR] INPUT...\n";
      return 2;
    } else files.push_back(arg);
  }
  std::string bundle = SelfDir();
  std::vector<Spec> specs = ReadSpecs(bundle + "/inputs.txt");
  if (files.size() != specs.size()) {
    std::string names;
    for (const Spec& s : specs) names += " " + s.name + "(" + Dims(s.shape) + " " + s.dtype + ")";
    throw Failure("the model takes " + std::to_string(specs.size()) + " input file(s):" + names +
                  "; got " + std::to_string(files.size()));
  }
  std::vector<ffi::Any> inputs;
  for (size_t i = 0; i < files.size(); ++i) inputs.push_back(ReadInput(files[i], specs[i], i));

  // Load the compiled library, make a VM from the executable inside it, and place it on the CPU
  // (device type, device id, allocator: 2 is the pooled allocator, as Python's default).
  Clock::time_point start = Clock::now();
  ffi::Module lib = ffi::Module::LoadFromFile(bundle + "/model.so");
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = vm->GetFunction("main").value();
  std::printf("load_ms %.3f\n", Ms(start));

  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  auto call = [&]() {
    ffi::Any result;
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    return result;
  };
  start = Clock::now();
  std::vector<ffi::Tensor> outputs;
  Flatten(call(), &outputs);
  std::printf("first_inference_ms %.3f\n", Ms(start));
  for (size_t i = 0; i < outputs.size(); ++i) {
    std::string path = out_dir + "/output" + std::to_string(i) + ".npy";
    WriteNpy(path, outputs[i]);
    std::printf("wrote %s\n", path.c_str());
  }
  if (repeat > 0) {  // one inference per sample, timed on this machine's steady clock
    for (int i = 0; i < warmup; ++i) call();
    std::vector<double> ms;
    for (int i = 0; i < repeat; ++i) {
      start = Clock::now();
      call();
      ms.push_back(Ms(start));
    }
    std::sort(ms.begin(), ms.end());
    double mean = 0, var = 0;
    for (double x : ms) mean += x / ms.size();
    for (double x : ms) var += (x - mean) * (x - mean) / ms.size();
    auto pct = [&](double p) { return ms[static_cast<size_t>(std::ceil(p * ms.size())) - 1]; };
    std::printf("latency_ms n=%d p50=%.3f p90=%.3f p99=%.3f mean=%.3f std=%.3f min=%.3f\n",
                repeat, pct(0.5), pct(0.9), pct(0.99), mean, std::sqrt(var), ms.front());
  }
  return 0;
}

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const ffi::Error& err) {  // TVM's own errors: its kind and the message's last line
    std::string message = err.message();
    while (!message.empty() && message.back() == '\n') message.pop_back();
    std::cerr << "edgekit-runner: error: " << err.kind() << ": "
              << message.substr(message.rfind('\n') + 1) << "\n";
  } catch (const std::exception& err) {
    std::cerr << "edgekit-runner: error: " << err.what() << "\n";
  }
  return 1;
}
