pub enum TokenizerFamily { ChatGlm2, InternLm2 }
