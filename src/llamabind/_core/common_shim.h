// What llamabind provides in place of llama.cpp's common/log.cpp (see common_shim.cpp).
#pragma once

#include <string>

namespace llamabind {

// While one is alive, the warning and error lines that llama.cpp's common/ code logs on
// this thread are also collected in text() (they still reach the log callback). Nests.
class LogCapture {
  public:
    LogCapture();
    ~LogCapture();
    LogCapture(const LogCapture &) = delete;
    LogCapture & operator=(const LogCapture &) = delete;

    const std::string & text() const { return text_; }

    // called by the log shim
    static void add(const char * line);

  private:
    std::string  text_;
    LogCapture * outer_;
};

}  // namespace llamabind
